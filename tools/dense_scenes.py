"""Procedural scenes for the dense demos (segmentation and depth), shared by tools/.

Deterministic given a seed: `scene_rng(split, index)` is the generator the shard writer
uses for scene `index` of a split, so a scene never depends on how many came before it.

Segmentation (`seg_scene`): a 64x64 grayscale canvas with 2 to 4 MNIST digits taken from
the given rows of one split (tools/demo_data.py), each rescaled to 16..32 px with PIL
bilinear and alpha-composited over a textured background (smooth blobs, sinusoidal
stripes, a little noise). The label map is 0 for background and 1 + d where digit d's
rescaled intensity exceeds 96; later digits overwrite earlier ones in image and label.

Depth (`depth_scene`): a ray-cast render (numpy, vectorised) of a textured ground plane
seen by a pinhole camera tilted down, with 1 to 3 spheres and/or yawed boxes resting on
it, Lambertian shading with cast shadows from a random directional light, 2x2
supersampled. Depth is exact per pixel centre: the distance along the optical axis (z),
in metres, roughly 1..10. 0 would mean invalid; these scenes have none.

The depth scenes use no MNIST rows; their splits are separated by seed instead
(SPLIT_CODES): train-time scenes come from the training seed, shards from their split's.
"""
import numpy as np
from PIL import Image

SIZE = 64
SEG_CLASSES = 11  # 0 background, 1 + d for digit d
SEG_CLASS_NAMES = ["background"] + [str(d) for d in range(10)]
INK_THRESHOLD = 96
SPLIT_CODES = {"train": 0, "validation": 1, "test": 2}

# Depth camera: 64x64 pinhole, focal length in pixels (about 60 degrees horizontal FOV).
FOCAL = 56.0
CHECKER_PERIOD = 0.5  # metres: a fixed texture scale is the absolute-scale cue
# Sensor noise (std, 0..255 scale): seg draws per scene from the range.
SEG_NOISE = (0.5, 2.0)
DEPTH_NOISE = 0.0  # a clean render; noise is a corruption


def scene_rng(split, index, task):
    """The generator for scene `index` of `split` ("seg" or "depth")."""
    return np.random.default_rng([SPLIT_CODES[split], {"seg": 11, "depth": 12}[task], index])


# --------------------------------------------------------------------- segmentation


def textured_background(rng, size=SIZE):
    """float32 [size,size] in 0..255: smooth blobs + stripes + noise, moderate contrast."""
    cells = int(rng.integers(3, 9))
    coarse = rng.random((cells, cells)).astype(np.float32)
    blobs = np.asarray(
        Image.fromarray(coarse, mode="F").resize((size, size), Image.BICUBIC), dtype=np.float32
    )
    blobs = (blobs - blobs.mean()) / (blobs.std() + 1e-6)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    angle = rng.uniform(0, np.pi)
    period = rng.uniform(6.0, 20.0)
    phase = rng.uniform(0, 2 * np.pi)
    stripes = np.sin(2 * np.pi * (xx * np.cos(angle) + yy * np.sin(angle)) / period + phase)
    w = rng.uniform(0.0, 1.0)
    tex = (1 - w) * blobs + w * stripes * 1.2
    tex = tex / (np.abs(tex).max() + 1e-6)
    mean = rng.uniform(40, 130)
    amp = rng.uniform(15, 45)
    bg = mean + amp * tex + rng.normal(0, rng.uniform(*SEG_NOISE), (size, size))
    return np.clip(bg, 0, 255).astype(np.float32)


def seg_scene(rng, images, labels, rows, size=SIZE):
    """(image uint8 [size,size], label uint8 [size,size]) from digits of `rows`."""
    img = textured_background(rng, size)
    lab = np.zeros((size, size), np.uint8)
    for _ in range(int(rng.integers(2, 5))):
        row = int(rows[rng.integers(len(rows))])
        side = int(rng.integers(16, 33))
        digit = np.asarray(
            Image.fromarray(images[row], mode="L").resize((side, side), Image.BILINEAR), dtype=np.float32
        )
        x0 = int(rng.integers(0, size - side + 1))
        y0 = int(rng.integers(0, size - side + 1))
        ink = rng.uniform(190, 255)
        alpha = digit / 255.0
        win = img[y0:y0 + side, x0:x0 + side]
        img[y0:y0 + side, x0:x0 + side] = win * (1 - alpha) + ink * alpha
        lab[y0:y0 + side, x0:x0 + side][digit > INK_THRESHOLD] = 1 + int(labels[row])
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), lab


# ---------------------------------------------------------------------------- depth


def _sphere_hits(o, d, centre, radius):
    """Nearest positive ray parameter per ray (inf where missed); also returns normals fn."""
    oc = o - centre
    a = np.einsum("ij,ij->i", d, d)
    b = 2 * np.einsum("ij,ij->i", d, oc) if oc.ndim == 2 else 2 * d @ oc
    c = (np.einsum("ij,ij->i", oc, oc) if oc.ndim == 2 else oc @ oc) - radius**2
    disc = b * b - 4 * a * c
    ok = disc > 0
    sq = np.sqrt(np.where(ok, disc, 0))
    t0 = (-b - sq) / (2 * a)
    t1 = (-b + sq) / (2 * a)
    t = np.where(t0 > 1e-4, t0, t1)
    return np.where(ok & (t > 1e-4), t, np.inf)


def _box_hits(o, d, box):
    """Nearest positive ray parameter (inf where missed) and the local hit axis."""
    centre, half, yaw = box
    c, s = np.cos(yaw), np.sin(yaw)
    # World -> box frame: rotate about Y by -yaw.
    rot = np.array([[c, 0, -s], [0, 1, 0], [s, 0, c]])
    ol = (o - centre) @ rot.T
    dl = d @ rot.T
    with np.errstate(divide="ignore", invalid="ignore"):
        inv = 1.0 / np.where(np.abs(dl) < 1e-12, 1e-12, dl)
        ta = (-half - ol) * inv
        tb = (half - ol) * inv
    tmin = np.minimum(ta, tb)
    tmax = np.maximum(ta, tb)
    tnear = tmin.max(axis=1)
    axis = tmin.argmax(axis=1)
    tfar = tmax.min(axis=1)
    hit = (tnear <= tfar) & (tfar > 1e-4)
    t = np.where(tnear > 1e-4, tnear, tfar)
    return np.where(hit, t, np.inf), axis, dl, rot


def _box_normals(axis, dl, rot, sel):
    n_local = np.zeros((sel.sum(), 3))
    ax = axis[sel]
    n_local[np.arange(len(ax)), ax] = -np.sign(dl[sel][np.arange(len(ax)), ax])
    return n_local @ rot  # box frame -> world


def _plane_albedo(rng_params, x, z):
    kind, a, b, yaw, off, noise = rng_params
    c, s = np.cos(yaw), np.sin(yaw)
    u = (c * x - s * z) / CHECKER_PERIOD + off[0]
    v = (s * x + c * z) / CHECKER_PERIOD + off[1]
    if kind == "checker":
        check = (np.floor(u).astype(np.int64) + np.floor(v).astype(np.int64)) % 2
        base = np.where(check == 0, a, b)
    else:
        # Value noise on a 0.5 m grid, bilinear, over a window the camera can see.
        n = noise.shape[0]
        uu = np.clip(u * 2 + n / 2, 0, n - 1.001)
        vv = np.clip(v * 2 + n / 2, 0, n - 1.001)
        i, j = np.floor(uu).astype(np.int64), np.floor(vv).astype(np.int64)
        fu, fv = uu - i, vv - j
        val = (noise[i, j] * (1 - fu) * (1 - fv) + noise[i + 1, j] * fu * (1 - fv)
               + noise[i, j + 1] * (1 - fu) * fv + noise[i + 1, j + 1] * fu * fv)
        base = a + (b - a) * val
    return base


def _cast(o, dirs, objects, plane_tex, light, ambient):
    """Shade rays: returns (intensity in 0..1, ray parameter t) per ray."""
    n_rays = len(dirs)
    t_best = np.full(n_rays, np.inf)
    # Plane y = 0.
    dy = dirs[:, 1]
    with np.errstate(divide="ignore"):
        tp = np.where(dy < -1e-9, -o[1] / dy, np.inf)
    t_best = tp.copy()
    which = np.full(n_rays, -1)
    box_cache = {}
    for k, (kind, params, _) in enumerate(objects):
        if kind == "sphere":
            t = _sphere_hits(o, dirs, params[0], params[1])
        else:
            t, axis, dl, rot = _box_hits(o, dirs, params)
            box_cache[k] = (axis, dl, rot)
        closer = t < t_best
        t_best = np.where(closer, t, t_best)
        which = np.where(closer, k, which)
    p = o + dirs * t_best[:, None]
    normal = np.zeros((n_rays, 3))
    albedo = np.zeros(n_rays)
    on_plane = which == -1
    normal[on_plane] = (0, 1, 0)
    albedo[on_plane] = _plane_albedo(plane_tex, p[on_plane, 0], p[on_plane, 2])
    for k, (kind, params, alb) in enumerate(objects):
        sel = which == k
        if not sel.any():
            continue
        if kind == "sphere":
            nn = (p[sel] - params[0]) / params[1]
        else:
            axis, dl, rot = box_cache[k]
            nn = _box_normals(axis, dl, rot, sel)
        normal[sel] = nn
        albedo[sel] = alb
    # Shadows: a ray from each hit point towards the light.
    origins = p + normal * 1e-3
    lit = np.ones(n_rays, bool)
    ldirs = np.broadcast_to(light, (n_rays, 3))
    for kind, params, _ in objects:
        if kind == "sphere":
            t = _sphere_hits(origins, ldirs, params[0], params[1])
        else:
            t = _box_hits(origins, ldirs, params)[0]
        lit &= ~np.isfinite(t)
    lambert = np.clip(normal @ light, 0, None) * lit
    return albedo * (ambient + (1 - ambient) * lambert), t_best


def _rays(h, pitch, coords_u, coords_v):
    """Ray directions (world, scaled so the camera-z component is 1) for pixel offsets."""
    right = np.array([1.0, 0.0, 0.0])
    fwd = np.array([0.0, -np.sin(pitch), np.cos(pitch)])
    down = np.array([0.0, -np.cos(pitch), -np.sin(pitch)])
    return (coords_u[:, None] / FOCAL) * right + (coords_v[:, None] / FOCAL) * down + fwd


def depth_scene(rng, size=SIZE, supersample=2):
    """(image uint8 [size,size], depth float32 [size,size] in metres along the optical axis)."""
    half_tan = (size / 2 - 0.5) / FOCAL
    while True:
        pitch = np.deg2rad(rng.uniform(37, 55))
        h = rng.uniform(1.3, 2.2)
        denom = np.sin(pitch) - half_tan * np.cos(pitch)
        if denom > 0 and h / denom <= 10.0:
            break
    o = np.array([0.0, h, 0.0])

    def ground_point(u, v):
        d = _rays(h, pitch, np.array([u]), np.array([v]))[0]
        t = -h / d[1]
        return o + d * t

    objects = []
    for _ in range(int(rng.integers(1, 4))):
        for _attempt in range(20):
            g = ground_point(rng.uniform(-26, 26), rng.uniform(-18, 28))
            alb = rng.uniform(0.35, 0.95)
            if rng.random() < 0.5:
                r = rng.uniform(0.2, 0.6)
                footprint = r
                obj = ("sphere", (np.array([g[0], r, g[2]]), r), alb)
            else:
                half = np.array([rng.uniform(0.15, 0.5), rng.uniform(0.15, 0.7), rng.uniform(0.15, 0.5)])
                footprint = np.hypot(half[0], half[2])
                obj = ("box", (np.array([g[0], half[1], g[2]]), half, rng.uniform(0, np.pi / 2)), alb)
            if np.hypot(g[0], g[2]) > footprint + 0.9:
                objects.append(obj)
                break
    a = rng.uniform(0.25, 0.6)
    b = np.clip(a + rng.choice([-1, 1]) * rng.uniform(0.15, 0.4), 0.05, 0.95)
    plane_tex = (
        "checker" if rng.random() < 0.6 else "noise", a, b, rng.uniform(0, np.pi),
        rng.uniform(0, 1, 2), rng.random((48, 48)),
    )
    elev = np.deg2rad(rng.uniform(25, 70))
    azim = rng.uniform(0, 2 * np.pi)
    light = np.array([np.cos(elev) * np.cos(azim), np.sin(elev), np.cos(elev) * np.sin(azim)])
    ambient = rng.uniform(0.2, 0.4)

    # Image: supersampled rays, box-averaged.
    s = size * supersample
    sub = (np.arange(s) + 0.5) / supersample - size / 2
    vv, uu = np.meshgrid(sub, sub, indexing="ij")
    shade, _ = _cast(o, _rays(h, pitch, uu.ravel(), vv.ravel()), objects, plane_tex, light, ambient)
    shade = shade.reshape(size, supersample, size, supersample).mean(axis=(1, 3))
    # Depth: exact at pixel centres; t is the camera-z distance because dirs have z = 1.
    ctr = np.arange(size) + 0.5 - size / 2
    vv, uu = np.meshgrid(ctr, ctr, indexing="ij")
    dirs = _rays(h, pitch, uu.ravel(), vv.ravel())
    t = np.full(len(dirs), np.inf)
    with np.errstate(divide="ignore"):
        t = np.where(dirs[:, 1] < -1e-9, -h / dirs[:, 1], np.inf)
    for kind, params, _ in objects:
        ti = _sphere_hits(o, dirs, params[0], params[1]) if kind == "sphere" else _box_hits(o, dirs, params)[0]
        t = np.minimum(t, ti)
    depth = np.where(np.isfinite(t), t, 0.0).astype(np.float32).reshape(size, size)
    img = 255.0 * shade + rng.normal(0, DEPTH_NOISE, shade.shape)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), depth


# ------------------------------------------------------------------------- batches


def seg_batch(rng, images, labels, rows, n):
    pairs = [seg_scene(rng, images, labels, rows) for _ in range(n)]
    return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])


def depth_batch(rng, n):
    pairs = [depth_scene(rng) for _ in range(n)]
    return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])
