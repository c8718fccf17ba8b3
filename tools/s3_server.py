"""The loopback S3 server for tests where several processes commit to one Delta table:
moto's S3, served one request at a time.

Usage: python tools/s3_server.py PORT

Why not s3s-fs (the server of the other S3 tests): its If-None-Match check and its write
are two steps, so two simultaneous creates of one key can both succeed, the second
silently replacing the first. A Delta commit relies on exactly that create being
atomic. moto checks and stores in one step of one request; serving requests one at a
time (werkzeug without threads) makes that step atomic across clients too. moto keeps
objects in memory: everything is gone when the process ends.
"""
import sys

from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app
from werkzeug.serving import run_simple


def main():
    port = int(sys.argv[1])
    app = DomainDispatcherApplication(create_backend_app)
    run_simple("127.0.0.1", port, app, threaded=False, processes=1)


if __name__ == "__main__":
    main()
