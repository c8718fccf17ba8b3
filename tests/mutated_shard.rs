//! Hostile input at dataset scale: one bad input costs one row, never the process.
//!
//! One WebDataset shard of 2,000 JPEG, PNG and WebP members, built here from valid images
//! at ImageNet sizes (224..500 px sides, gray, RGB, RGBA, 16-bit) and camera sizes
//! (4032x3024, 3000x2000), then mutated: bit flips (anywhere, or in the header),
//! truncations (to 0 bytes, a few bytes, anywhere), header edits (JPEG SOF/DHT/SOS
//! fields, PNG IHDR fields with the CRC fixed or not, WebP RIFF/VP8L fields), huge
//! declared sizes (decompression-bomb shaped: 65535x65535, 60000 px sides, both sides of
//! the `limits.max_pixels` boundary, a VP8X canvas around a small bitstream), chunk and
//! segment duplication, splices of two files, trailing junk, random garbage, zero-length
//! members and misleading extensions. A share of members is left as encoded, and labels
//! are valid, absent or broken.
//!
//! The real binary runs the shard (method `source`, the demo bundle, default limits) and
//! must exit 0 with exactly one row per sample, every status one of the documented ones,
//! the statuses the contract fixes (unmutated: `ok`/`bad_label`/`missing_label` from the
//! label; empty or garbage: `decode_error`; a well-formed header over `max_pixels`:
//! `too_large`), an `error` on every row without a prediction and a prediction on every
//! row with one. A second run with `[corrupt]` on (four corruptions at severity 1, plus
//! the clean variant) does the same per (sample, variant) on 400 of the members, four of
//! them camera-size or padded bombs (corruptions work on the full-scale image, so every
//! decodable mutant goes through them at its decoded size), and checks that each
//! sample's status agrees across its variants and with the first run (where the first
//! run may have decoded a JPEG at reduced scale with another decoder, only a defect must
//! agree).
//!
//! Everything derives from one seed, printed at the start and in every assertion: set
//! `DTTA_TEST_SEED` to replay a run (decimal or 0x-hex); without it the seed comes from
//! the clock. `DTTA_FUZZ_KEEP=1` keeps the shard and outputs on disk. If the process
//! fails, the test bisects the shard down to one member and names it in the failure.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Instant;

use arrow_array::{Array, Int32Array, Int64Array, StringArray};
use common::*;
use image::codecs::jpeg::JpegEncoder;
use image::codecs::png::PngEncoder;
use image::codecs::webp::WebPEncoder;
use image::{DynamicImage, ImageBuffer, Luma, LumaA, Rgb, Rgba};

/// Samples (image members) in the shard.
const MEMBERS: usize = 2000;
/// Samples of the `[corrupt]` run: the first ones of the same member list.
const CORRUPT_MEMBERS: usize = 400;
/// Camera-size or padded-bomb members among them.
const HEAVY_CORRUPTED: usize = 4;
/// The `[corrupt]` section of the second run: cheap corruptions, one severity, plus the
/// clean variant: 5 rows per sample.
const CORRUPT: &str =
    "[corrupt]\nkinds = [\"gaussian_noise\", \"contrast\", \"jpeg_compression\", \"pixelate\"]\nseverities = [1]\n";
const VARIANTS: [(&str, i32); 5] = [
    ("clean", 0),
    ("gaussian_noise", 1),
    ("contrast", 1),
    ("jpeg_compression", 1),
    ("pixelate", 1),
];
/// The default `limits.max_pixels`; the test never changes the limits.
const MAX_PIXELS: u64 = 89_478_485;
const STATUSES: [&str; 7] = [
    "ok",
    "decode_error",
    "too_large",
    "no_image",
    "bad_label",
    "missing_label",
    "diverged",
];
/// Statuses whose rows carry a prediction.
const PREDICTED: [&str; 4] = ["ok", "bad_label", "missing_label", "diverged"];

// ---------------------------------------------------------------------------------------
// Randomness: splitmix64, so that one u64 replays everything.

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in 0..n (n > 0).
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    /// Uniform in lo..=hi.
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }
    fn usize(&mut self, lo: usize, hi: usize) -> usize {
        self.range(lo as u64, hi as u64) as usize
    }
    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }
    fn unit(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 24) as f32
    }
}

// ---------------------------------------------------------------------------------------
// Valid base images.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    Jpeg,
    Png,
    Webp,
}

#[derive(Debug, Clone, Copy)]
enum Color {
    L8,
    La8,
    Rgb8,
    Rgba8,
    L16,
    Rgb16,
}

struct Base {
    format: Format,
    width: u32,
    height: u32,
    color: Color,
    camera: bool,
    bytes: Vec<u8>,
}

impl Base {
    fn describe(&self) -> String {
        format!(
            "{:?} {}x{} {:?} ({}, {} bytes)",
            self.format,
            self.width,
            self.height,
            self.color,
            if self.camera { "camera size" } else { "ImageNet size" },
            self.bytes.len()
        )
    }
}

/// A picture with real entropy for JPEG: sinusoids at random frequencies, a gradient and
/// pixel noise, per channel.
fn picture(width: u32, height: u32, color: Color, rng: &mut Rng) -> DynamicImage {
    // Longer waves and less grain at camera size keep those members at 1-5 MB.
    let camera = width * height > 1 << 20;
    let reach = if camera { 0.01 } else { 0.1 };
    let (fx, fy) = (0.002 + reach * rng.unit(), 0.002 + reach * rng.unit());
    let phase = 6.0 * rng.unit();
    let noise = if camera { 0.002 } else { 0.005 + 0.025 * rng.unit() };
    let salt = rng.next();
    let (w, h) = (width as f32, height as f32);
    let value = move |x: u32, y: u32, c: u32| -> f32 {
        let (xf, yf) = (x as f32, y as f32);
        let wave = (xf * fx + yf * fy * (1.0 + c as f32 * 0.3) + phase + c as f32).sin();
        let ramp = (xf / w + yf / h) * 0.5;
        let mut n = salt ^ (u64::from(x) << 32 | u64::from(y)) ^ (u64::from(c) << 60);
        let grain = Rng(n).next();
        n = grain >> 40;
        let grain = n as f32 / (1u64 << 24) as f32 - 0.5;
        (0.45 + 0.25 * wave + 0.25 * ramp - 0.12 + noise * grain).clamp(0.0, 1.0)
    };
    let u8v = |x, y, c| (value(x, y, c) * 255.0) as u8;
    let u16v = |x, y, c| (value(x, y, c) * 65535.0) as u16;
    match color {
        Color::L8 => DynamicImage::ImageLuma8(ImageBuffer::from_fn(width, height, |x, y| Luma([u8v(x, y, 0)]))),
        Color::La8 => DynamicImage::ImageLumaA8(ImageBuffer::from_fn(width, height, |x, y| {
            LumaA([u8v(x, y, 0), u8v(x, y, 1)])
        })),
        Color::Rgb8 => DynamicImage::ImageRgb8(ImageBuffer::from_fn(width, height, |x, y| {
            Rgb([u8v(x, y, 0), u8v(x, y, 1), u8v(x, y, 2)])
        })),
        Color::Rgba8 => DynamicImage::ImageRgba8(ImageBuffer::from_fn(width, height, |x, y| {
            Rgba([u8v(x, y, 0), u8v(x, y, 1), u8v(x, y, 2), u8v(x, y, 3)])
        })),
        Color::L16 => DynamicImage::ImageLuma16(ImageBuffer::from_fn(width, height, |x, y| Luma([u16v(x, y, 0)]))),
        Color::Rgb16 => DynamicImage::ImageRgb16(ImageBuffer::from_fn(width, height, |x, y| {
            Rgb([u16v(x, y, 0), u16v(x, y, 1), u16v(x, y, 2)])
        })),
    }
}

fn encode(img: &DynamicImage, format: Format, rng: &mut Rng) -> Vec<u8> {
    let mut out = Cursor::new(Vec::new());
    match format {
        Format::Jpeg => {
            let quality = *rng.pick(&[60u8, 75, 90, 95]);
            img.write_with_encoder(JpegEncoder::new_with_quality(&mut out, quality))
        }
        Format::Png => img.write_with_encoder(PngEncoder::new(&mut out)),
        Format::Webp => img.write_with_encoder(WebPEncoder::new_lossless(&mut out)),
    }
    .unwrap_or_else(|e| panic!("encoding {format:?} {:?}: {e}", img.color()));
    out.into_inner()
}

/// ImageNet-size bases (several per format, sides 224..=500, half of them multiples of 8
/// so that the reduced JPEG decode applies) and four camera-size ones.
fn bases(rng: &mut Rng) -> (Vec<Base>, Vec<Base>) {
    let mut imagenet = Vec::new();
    let colors: [(Format, &[Color]); 3] = [
        (Format::Jpeg, &[Color::Rgb8, Color::L8]),
        (
            Format::Png,
            &[
                Color::Rgb8,
                Color::L8,
                Color::Rgba8,
                Color::La8,
                Color::L16,
                Color::Rgb16,
            ],
        ),
        (Format::Webp, &[Color::Rgb8, Color::Rgba8, Color::L8]),
    ];
    for (format, palette) in colors {
        for i in 0..10 {
            let mut side = || {
                let s = rng.range(224, 500) as u32;
                if i % 2 == 0 {
                    s / 8 * 8
                } else {
                    s
                }
            };
            let (mut width, mut height) = (side(), side());
            if format == Format::Png && i == 0 {
                // A size whose crop window, computed in floating point, ends a hair past
                // the image edge for the demo's 28/28 view (28 * (232 / 28) > 232).
                (width, height) = (288, 232);
            }
            let color = palette[i % palette.len()];
            let img = picture(width, height, color, rng);
            imagenet.push(Base {
                format,
                width,
                height,
                color,
                camera: false,
                bytes: encode(&img, format, rng),
            });
        }
    }
    let mut camera = Vec::new();
    for (format, width, height, color) in [
        (Format::Jpeg, 4032, 3024, Color::Rgb8),
        (Format::Jpeg, 3000, 2000, Color::L8),
        (Format::Png, 3000, 2000, Color::Rgb8),
        (Format::Webp, 3000, 2000, Color::Rgb8),
    ] {
        let img = picture(width, height, color, rng);
        camera.push(Base {
            format,
            width,
            height,
            color,
            camera: true,
            bytes: encode(&img, format, rng),
        });
    }
    (imagenet, camera)
}

// ---------------------------------------------------------------------------------------
// Format surgery.

fn be16(b: &[u8], at: usize) -> usize {
    (usize::from(b[at]) << 8) | usize::from(b[at + 1])
}

fn put_be16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_be_bytes());
}

/// JPEG marker segments before the entropy-coded data: (offset of 0xFF, marker, bytes of
/// the whole segment including marker and length). Stops after SOS.
fn jpeg_segments(b: &[u8]) -> Vec<(usize, u8, usize)> {
    let mut out = Vec::new();
    let mut pos = 2;
    while pos + 4 <= b.len() && b[pos] == 0xFF {
        let marker = b[pos + 1];
        if marker == 0xFF {
            pos += 1;
            continue;
        }
        let len = be16(b, pos + 2);
        out.push((pos, marker, 2 + len));
        if marker == 0xDA {
            break;
        }
        pos += 2 + len;
    }
    out
}

fn is_sof(marker: u8) -> bool {
    (0xC0..=0xCF).contains(&marker) && ![0xC4, 0xC8, 0xCC].contains(&marker)
}

fn jpeg_sof(b: &[u8]) -> usize {
    jpeg_segments(b)
        .into_iter()
        .find(|s| is_sof(s.1))
        .expect("the encoder writes a SOF")
        .0
}

fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &byte in data {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// PNG chunks: (offset of the length field, data length, type).
fn png_chunks(b: &[u8]) -> Vec<(usize, usize, [u8; 4])> {
    let mut out = Vec::new();
    let mut pos = 8;
    while pos + 12 <= b.len() {
        let len = u32::from_be_bytes(b[pos..pos + 4].try_into().unwrap()) as usize;
        let kind: [u8; 4] = b[pos + 4..pos + 8].try_into().unwrap();
        out.push((pos, len, kind));
        pos += 12 + len;
    }
    out
}

/// Rewrites the CRC of the chunk whose length field is at `at`.
fn png_fix_crc(b: &mut [u8], at: usize) {
    let len = u32::from_be_bytes(b[at..at + 4].try_into().unwrap()) as usize;
    let crc = crc32(&b[at + 4..at + 8 + len]);
    b[at + 8 + len..at + 12 + len].copy_from_slice(&crc.to_be_bytes());
}

/// IHDR of an encoder-written PNG: width at 16, height at 20, depth 24, colour type 25,
/// compression 26, filter 27, interlace 28, CRC at 29.
const IHDR: usize = 8;

fn png_set_size(b: &mut [u8], width: u32, height: u32, fix_crc: bool) {
    b[16..20].copy_from_slice(&width.to_be_bytes());
    b[20..24].copy_from_slice(&height.to_be_bytes());
    if fix_crc {
        png_fix_crc(b, IHDR);
    }
}

/// The RIFF size field after a change of length.
fn webp_fix_riff(b: &mut [u8]) {
    let size = (b.len() - 8) as u32;
    b[4..8].copy_from_slice(&size.to_le_bytes());
}

/// VP8L header of an encoder-written WebP: "VP8L" at 12, chunk size at 16, signature 0x2f
/// at 20, then 14 bits width-1, 14 bits height-1, alpha hint, 3 bits version.
fn webp_set_vp8l_size(b: &mut [u8], width: u32, height: u32) {
    let old = u32::from_le_bytes(b[21..25].try_into().unwrap());
    let bits = ((width - 1) & 0x3fff) | (((height - 1) & 0x3fff) << 14) | (old & 0xf000_0000);
    b[21..25].copy_from_slice(&bits.to_le_bytes());
}

/// The file with a VP8X chunk declaring a `width` x `height` canvas in front of its VP8L
/// chunk.
fn webp_with_vp8x(b: &[u8], width: u32, height: u32) -> Vec<u8> {
    let mut out = b[..12].to_vec();
    out.extend_from_slice(b"VP8X");
    out.extend_from_slice(&10u32.to_le_bytes());
    out.extend_from_slice(&[0, 0, 0, 0]);
    out.extend_from_slice(&(width - 1).to_le_bytes()[..3]);
    out.extend_from_slice(&(height - 1).to_le_bytes()[..3]);
    out.extend_from_slice(&b[12..]);
    webp_fix_riff(&mut out);
    out
}

// ---------------------------------------------------------------------------------------
// Mutations.

/// What the contract says about a member's status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    /// The image decodes: the status is the label's (`ok`, `bad_label`, `missing_label`).
    Decodes,
    DecodeError,
    TooLarge,
    /// Refused without a prediction (`decode_error` or `too_large`): a declared size the
    /// decoder library itself refuses before the pixel limit is checked.
    Rejected,
    /// Whatever the decoders make of it, as long as it is one row with a known status.
    Any,
}

struct Mutant {
    bytes: Vec<u8>,
    /// The mutation family, for the per-family table.
    family: &'static str,
    /// The mutation in words, precise enough to redo it by hand.
    what: String,
    expect: Expect,
}

fn mutant(bytes: Vec<u8>, family: &'static str, what: String, expect: Expect) -> Mutant {
    Mutant {
        bytes,
        family,
        what,
        expect,
    }
}

fn flip_bits(mut b: Vec<u8>, n: usize, span: usize, rng: &mut Rng) -> (Vec<u8>, String) {
    let span = span.min(b.len()).max(1);
    let mut at = Vec::new();
    for _ in 0..n {
        let byte = rng.below(span as u64) as usize;
        let bit = rng.below(8) as u8;
        b[byte] ^= 1 << bit;
        at.push(format!("{byte}.{bit}"));
    }
    (b, format!("bits [{}]", at.join(", ")))
}

/// A huge declared size (width, height), at most `max` a side. Three in four are over
/// `max_pixels` (a well-formed header must then give `too_large`); the others are bombs
/// just under it, which decoders may pad out to a full image (slow: kept rare).
fn huge_size(base: &Base, max: u32, rng: &mut Rng) -> (u32, u32) {
    let big = |rng: &mut Rng| rng.range(10000, u64::from(max)) as u32;
    if rng.below(4) != 0 {
        let choices = [
            (max, max),
            (60000.min(max), 60000.min(max)),
            // Just over the boundary: 9460^2 = 89,491,600.
            (9460, 9460),
            (16383, 16384),
            (big(rng), big(rng)),
        ];
        *rng.pick(&choices)
    } else {
        let choices = [
            // Just under the boundary: 9459^2 = 89,472,681.
            (9459, 9459),
            (max, base.height),
            (base.width, 60000.min(max)),
            (big(rng), base.height.min(1000)),
        ];
        *rng.pick(&choices)
    }
}

fn expect_for_size(width: u32, height: u32) -> Expect {
    if u64::from(width) * u64::from(height) > MAX_PIXELS {
        Expect::TooLarge
    } else {
        Expect::Any
    }
}

/// image-webp 0.2 reads a 16384 VP8L side as 0 (`(1 + bits) & 0x3FFF`): "no pixels".
fn vp8l_expect(width: u32, height: u32) -> Expect {
    if width == 16384 || height == 16384 {
        Expect::Rejected
    } else {
        expect_for_size(width, height)
    }
}

fn header_edit(base: &Base, rng: &mut Rng) -> Mutant {
    let mut b = base.bytes.clone();
    let fam = "header edit";
    match base.format {
        Format::Jpeg => {
            let segs = jpeg_segments(&b);
            let sof = jpeg_sof(&b);
            match rng.below(6) {
                0 => {
                    let side = |rng: &mut Rng| *rng.pick(&[0u16, 1, 7, 8, 9, 255, 4096]);
                    let (h, w) = (side(rng), side(rng));
                    put_be16(&mut b, sof + 5, h);
                    put_be16(&mut b, sof + 7, w);
                    let expect = if h == 0 || w == 0 {
                        Expect::DecodeError
                    } else {
                        Expect::Any
                    };
                    mutant(b, fam, format!("JPEG SOF size set to {w}x{h}"), expect)
                }
                1 => {
                    let n = *rng.pick(&[0u8, 2, 4, 255]);
                    b[sof + 9] = n;
                    mutant(b, fam, format!("JPEG SOF component count set to {n}"), Expect::Any)
                }
                2 => {
                    let v = *rng.pick(&[0x00u8, 0xFF, 0x44, 0x15, 0x80]);
                    b[sof + 11] = v;
                    mutant(
                        b,
                        fam,
                        format!("JPEG SOF first sampling factors set to {v:#04x}"),
                        Expect::Any,
                    )
                }
                3 => {
                    let dht: Vec<_> = segs.iter().filter(|s| s.1 == 0xC4).collect();
                    let at = rng.pick(&dht).0;
                    let count = at + 5 + rng.below(16) as usize;
                    b[count] = 0xFF;
                    mutant(
                        b,
                        fam,
                        format!("JPEG DHT code count at {count} set to 255"),
                        Expect::Any,
                    )
                }
                4 => {
                    let sos = segs.iter().find(|s| s.1 == 0xDA).expect("SOS").0;
                    let at = sos + 4 + rng.below(4) as usize;
                    let v = rng.below(256) as u8;
                    b[at] = v;
                    mutant(b, fam, format!("JPEG SOS byte {at} set to {v:#04x}"), Expect::Any)
                }
                _ => {
                    let (seg, marker, len) = *rng.pick(&segs);
                    let v = *rng.pick(&[0u16, 1, 2, 0xFFFF, (len as u16).wrapping_add(7)]);
                    put_be16(&mut b, seg + 2, v);
                    mutant(
                        b,
                        fam,
                        format!("JPEG segment {marker:#04x} at {seg}: length set to {v}"),
                        Expect::Any,
                    )
                }
            }
        }
        Format::Png => {
            let fix = rng.below(3) != 0;
            let crc = if fix { "CRC fixed" } else { "CRC stale" };
            match rng.below(4) {
                0 => {
                    let side = |rng: &mut Rng| *rng.pick(&[0u32, 1, 3, 255, 4096, 0x8000_0000, u32::MAX]);
                    let (w, h) = (side(rng), side(rng));
                    png_set_size(&mut b, w, h, fix);
                    let expect = if w == 0 || h == 0 {
                        Expect::DecodeError
                    } else {
                        Expect::Any
                    };
                    mutant(b, fam, format!("PNG IHDR size set to {w}x{h}, {crc}"), expect)
                }
                1 => {
                    let (field, at, v) = *rng.pick(&[
                        ("bit depth", 24usize, 0u8),
                        ("bit depth", 24, 3),
                        ("bit depth", 24, 32),
                        ("colour type", 25, 1),
                        ("colour type", 25, 7),
                        ("colour type", 25, 3),
                        ("compression", 26, 1),
                        ("filter", 27, 9),
                        ("interlace", 28, 1),
                        ("interlace", 28, 2),
                    ]);
                    b[at] = v;
                    if fix {
                        png_fix_crc(&mut b, IHDR);
                    }
                    mutant(b, fam, format!("PNG IHDR {field} set to {v}, {crc}"), Expect::Any)
                }
                2 => {
                    let chunks = png_chunks(&b);
                    let (at, len, kind) = *rng.pick(&chunks);
                    let v = *rng.pick(&[0u32, 1, len as u32 + 1, 0x7FFF_FFFF, u32::MAX]);
                    b[at..at + 4].copy_from_slice(&v.to_be_bytes());
                    mutant(
                        b,
                        fam,
                        format!(
                            "PNG chunk {} at {at}: length {len} set to {v}",
                            String::from_utf8_lossy(&kind)
                        ),
                        Expect::Any,
                    )
                }
                _ => {
                    let at = rng.usize(0, 7);
                    let v = rng.below(256) as u8;
                    b[at] = v;
                    mutant(b, fam, format!("PNG signature byte {at} set to {v:#04x}"), Expect::Any)
                }
            }
        }
        Format::Webp => match rng.below(4) {
            0 => {
                let v = *rng.pick(&[0u32, 4, 12, (b.len() / 2) as u32, u32::MAX]);
                b[4..8].copy_from_slice(&v.to_le_bytes());
                mutant(b, fam, format!("WebP RIFF size set to {v}"), Expect::Any)
            }
            1 => {
                let v = *rng.pick(&[0u32, 1, 5, (b.len() / 3) as u32, u32::MAX]);
                b[16..20].copy_from_slice(&v.to_le_bytes());
                mutant(b, fam, format!("WebP VP8L chunk size set to {v}"), Expect::Any)
            }
            2 => {
                let (w, h) = (rng.range(1, 16384) as u32, rng.range(1, 16384) as u32);
                let (w, h) = *rng.pick(&[(w, h), (1, 1), (w, 1), (base.width + 1, base.height)]);
                webp_set_vp8l_size(&mut b, w, h);
                mutant(b, fam, format!("WebP VP8L size set to {w}x{h}"), vp8l_expect(w, h))
            }
            _ => {
                let (at, v) = (rng.usize(20, 24), rng.below(256) as u8);
                b[at] = v;
                mutant(
                    b,
                    fam,
                    format!("WebP VP8L header byte {at} set to {v:#04x}"),
                    Expect::Any,
                )
            }
        },
    }
}

fn huge(base: &Base, rng: &mut Rng) -> Mutant {
    let mut b = base.bytes.clone();
    let fam = "huge size";
    match base.format {
        Format::Jpeg => {
            let (w, h) = huge_size(base, 65535, rng);
            let sof = jpeg_sof(&b);
            put_be16(&mut b, sof + 5, h as u16);
            put_be16(&mut b, sof + 7, w as u16);
            mutant(b, fam, format!("JPEG SOF size set to {w}x{h}"), expect_for_size(w, h))
        }
        Format::Png => {
            let (w, h) = huge_size(base, 65535, rng);
            let (w, h) = *rng.pick(&[(w, h), (w, h), (1 << 24, 1 << 24), (0x7FFF_FFFF, 0x7FFF_FFFF)]);
            png_set_size(&mut b, w, h, true);
            // The png crate refuses 2^31-1 sides itself ("Memory limit exceeded").
            let expect = if w == 0x7FFF_FFFF {
                Expect::Rejected
            } else {
                expect_for_size(w, h)
            };
            mutant(b, fam, format!("PNG IHDR size set to {w}x{h}, CRC fixed"), expect)
        }
        Format::Webp => {
            if rng.below(2) == 0 {
                // VP8L sides are 14 bits: 16384 at most.
                let (w, h) = huge_size(base, 16384, rng);
                webp_set_vp8l_size(&mut b, w, h);
                mutant(b, fam, format!("WebP VP8L size set to {w}x{h}"), vp8l_expect(w, h))
            } else {
                let (w, h) = huge_size(base, 1 << 24, rng);
                let (w, h) = *rng.pick(&[(w, h), (65535, 65535), (1 << 24, 1 << 24)]);
                let b = webp_with_vp8x(&b, w, h);
                // image-webp refuses a canvas whose pixel count overflows u32 ("Image too large").
                let expect = if u64::from(w) * u64::from(h) > u64::from(u32::MAX) {
                    Expect::Rejected
                } else {
                    expect_for_size(w, h)
                };
                mutant(
                    b,
                    fam,
                    format!("WebP VP8X canvas {w}x{h} added before the VP8L chunk"),
                    expect,
                )
            }
        }
    }
}

fn duplicate_chunk(base: &Base, rng: &mut Rng) -> Mutant {
    let b = &base.bytes;
    let fam = "chunk duplication";
    let (start, len, what) = match base.format {
        Format::Jpeg => {
            let segs = jpeg_segments(b);
            let (at, marker, len) = *rng.pick(&segs);
            (at, len, format!("JPEG segment {marker:#04x} at {at} ({len} bytes)"))
        }
        Format::Png => {
            let chunks = png_chunks(b);
            let (at, len, kind) = *rng.pick(&chunks);
            (
                at,
                len + 12,
                format!(
                    "PNG chunk {} at {at} ({len} data bytes)",
                    String::from_utf8_lossy(&kind)
                ),
            )
        }
        Format::Webp => (12, b.len() - 12, "WebP VP8L chunk".to_string()),
    };
    let end = (start + len).min(b.len());
    let mut out = b[..end].to_vec();
    out.extend_from_slice(&b[start..end]);
    out.extend_from_slice(&b[end..]);
    if base.format == Format::Webp {
        webp_fix_riff(&mut out);
    }
    mutant(out, fam, format!("{what} written twice"), Expect::Any)
}

/// Random bytes that no decoder takes for an image: the first byte starts no signature
/// the `image` crate knows.
fn garbage(rng: &mut Rng) -> (Vec<u8>, usize) {
    let any = rng.usize(1, 200_000);
    let len = *rng.pick(&[1usize, 2, 3, 8, 100, 4096, any]);
    let mut b: Vec<u8> = (0..len).map(|_| rng.below(256) as u8).collect();
    b[0] = *rng.pick(b"acdefhjklnouvwxyz0123456789");
    (b, len)
}

fn mutate(base: &Base, all: &[Base], rng: &mut Rng) -> Mutant {
    let b = &base.bytes;
    let roll = rng.below(100);
    match roll {
        0..=29 => mutant(b.clone(), "unmutated", "unmutated".into(), Expect::Decodes),
        30..=44 => {
            let n = rng.usize(1, 16);
            let (out, at) = flip_bits(b.clone(), n, b.len(), rng);
            mutant(out, "bit flips", format!("{n} bit flips anywhere: {at}"), Expect::Any)
        }
        45..=51 => {
            let span = rng.usize(64, 512);
            let n = rng.usize(1, 6);
            let (out, at) = flip_bits(b.clone(), n, span, rng);
            mutant(
                out,
                "header bit flips",
                format!("{n} bit flips in the first {span} bytes: {at}"),
                Expect::Any,
            )
        }
        52..=63 => {
            let len = match rng.below(6) {
                0 => 0,
                1 => rng.usize(1, 16),
                2 => b.len() - 1,
                3 => b.len() - 2,
                _ => rng.usize(17, b.len() - 1),
            };
            let expect = if len <= 16 { Expect::DecodeError } else { Expect::Any };
            mutant(
                b[..len].to_vec(),
                "truncation",
                format!("truncated to {len} of {} bytes", b.len()),
                expect,
            )
        }
        64..=73 => header_edit(base, rng),
        74..=81 => huge(base, rng),
        82..=86 => duplicate_chunk(base, rng),
        87..=89 => {
            let (out, len) = garbage(rng);
            mutant(out, "garbage", format!("{len} random bytes"), Expect::DecodeError)
        }
        90..=91 => mutant(
            Vec::new(),
            "zero length",
            "zero-length member".into(),
            Expect::DecodeError,
        ),
        92..=93 => {
            // Right after the signature: the format is sniffed, the rest is noise.
            let keep = match base.format {
                Format::Jpeg => 3,
                Format::Png => 8,
                Format::Webp => 16,
            };
            let (mut out, len) = garbage(rng);
            out.splice(0..0, b[..keep].iter().copied());
            mutant(
                out,
                "signature + garbage",
                format!("first {keep} bytes then {len} random bytes"),
                Expect::Any,
            )
        }
        94..=95 => {
            let junk = rng.usize(1, 5000);
            let mut out = b.clone();
            out.extend((0..junk).map(|_| rng.below(256) as u8));
            mutant(
                out,
                "trailing junk",
                format!("{junk} random bytes appended"),
                Expect::Any,
            )
        }
        _ => {
            let other = rng.pick(all);
            let cut = rng.usize(1, b.len() - 1);
            let from = rng.usize(0, other.bytes.len() - 1);
            let mut out = b[..cut].to_vec();
            out.extend_from_slice(&other.bytes[from..]);
            mutant(
                out,
                "splice",
                format!("first {cut} bytes, then {} from byte {from}", other.describe()),
                Expect::Any,
            )
        }
    }
}

// ---------------------------------------------------------------------------------------
// The shard.

struct Member {
    key: String,
    /// Tar member name of the image.
    image_name: String,
    bytes: Vec<u8>,
    /// Tar member name and bytes of the label, if any.
    label_member: Option<TarMember>,
    /// The label the reader must report (`None`: no label or a broken one).
    label: Option<i64>,
    /// The status a decodable image gets: `ok`, `bad_label` or `missing_label`.
    label_status: &'static str,
    label_first: bool,
    family: &'static str,
    expect: Expect,
    /// Camera size, or a declared size under the pixel limit but far beyond the data.
    heavy: bool,
    description: String,
}

impl Member {
    fn starts_as_jpeg(&self) -> bool {
        self.bytes.starts_with(&[0xFF, 0xD8, 0xFF])
    }
}

fn members(seed: u64) -> Vec<Member> {
    let mut rng = Rng(seed);
    let started = Instant::now();
    let (imagenet, camera) = bases(&mut rng);
    eprintln!(
        "mutated_shard: seed {seed}: {} base images encoded in {:.1} s; camera size: {}",
        imagenet.len() + camera.len(),
        started.elapsed().as_secs_f64(),
        camera.iter().map(Base::describe).collect::<Vec<_>>().join("; ")
    );
    let mut out = Vec::with_capacity(MEMBERS);
    for i in 0..MEMBERS {
        // About 1.5% camera size (~30 members of 1-5 MB): enough to cover the large
        // paths, few enough to keep the run short.
        let base: &Base = if rng.below(1000) < 15 {
            rng.pick(&camera)
        } else {
            rng.pick(&imagenet)
        };
        let mutant = mutate(base, &imagenet, &mut rng);
        let key = format!("m{i:05}");
        let natural = match base.format {
            Format::Jpeg => *rng.pick(&["jpg", "jpg", "jpeg"]),
            Format::Png => "png",
            Format::Webp => "webp",
        };
        // A few unmutated images under another (or upper-case) image extension: the
        // format comes from the bytes.
        let (ext, family, what) = if mutant.family == "unmutated" && rng.below(20) == 0 {
            let ext = *rng.pick(&["JPG", "png", "webp", "jpeg", "Png"]);
            (ext, "wrong extension", format!("unmutated, named .{ext}"))
        } else {
            (natural, mutant.family, mutant.what)
        };
        let (label_member, label, label_status) = label_for(&key, &mut rng);
        let description = format!(
            "{key}.{ext}: {} | {what} | {} -> {} bytes | label {:?}",
            base.describe(),
            base.bytes.len(),
            mutant.bytes.len(),
            label_member
                .as_ref()
                .map(|(n, b)| format!("{n} = {:?}", String::from_utf8_lossy(b))),
        );
        let heavy = base.camera || (family == "huge size" && mutant.expect == Expect::Any);
        out.push(Member {
            heavy,
            image_name: format!("{key}.{ext}"),
            key,
            bytes: mutant.bytes,
            label_member,
            label,
            label_status,
            label_first: rng.below(10) == 0,
            family,
            expect: mutant.expect,
            description,
        });
    }
    out
}

/// A tar member (name, bytes).
type TarMember = (String, Vec<u8>);

/// A label member: mostly a valid class index, sometimes absent or broken. Returns the
/// member, the label the reader must report, and the status of a decodable image.
fn label_for(key: &str, rng: &mut Rng) -> (Option<TarMember>, Option<i64>, &'static str) {
    let cls = |b: &[u8]| Some((format!("{key}.cls"), b.to_vec()));
    match rng.below(100) {
        0..=74 => {
            let class = rng.below(10) as i64;
            let text = *rng.pick(&["{}", " {}\n", "{}\n"]);
            (
                cls(text.replace("{}", &class.to_string()).as_bytes()),
                Some(class),
                "ok",
            )
        }
        75..=79 => {
            // Integers, though not classes of a 10-class model: still labels.
            let v = *rng.pick(&[-1i64, 10, 1_000_000, i64::MAX, i64::MIN]);
            (cls(v.to_string().as_bytes()), Some(v), "ok")
        }
        80..=89 => (None, None, "missing_label"),
        _ => {
            let bad: &[&[u8]] = &[
                b"three",
                b"",
                b"3.5",
                b"0x10",
                b"99999999999999999999",
                b"\xff\xfe\x00",
                b"1 2",
                b"\0",
            ];
            let text: &[u8] = bad[rng.usize(0, bad.len() - 1)];
            (cls(text), None, "bad_label")
        }
    }
}

fn write_shard(path: &Path, members: &[&Member]) {
    let mut builder = tar::Builder::new(File::create(path).unwrap());
    let mut append = |name: &str, data: &[u8]| {
        let mut header = tar::Header::new_gnu();
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        header.set_cksum();
        builder.append_data(&mut header, name, data).unwrap();
    };
    for m in members {
        let label = m.label_member.as_ref();
        if m.label_first {
            if let Some((name, data)) = label {
                append(name, data);
            }
        }
        append(&m.image_name, &m.bytes);
        if !m.label_first {
            if let Some((name, data)) = label {
                append(name, data);
            }
        }
    }
    builder.finish().unwrap();
}

// ---------------------------------------------------------------------------------------
// Running and reading back.

/// Runs the binary on a shard of `members` under `dir`; `extra` is appended to the
/// pipeline file.
fn run_on(dir: &Path, members: &[&Member], extra: &str) -> (Output, PathBuf, f64) {
    std::fs::create_dir_all(dir).unwrap();
    let shard = dir.join("fuzz-000000.tar");
    write_shard(&shard, members);
    let out = dir.join("out");
    let pipeline = write_pipeline(dir, &shard.to_string_lossy(), &out.to_string_lossy(), extra);
    let started = Instant::now();
    let output = run_dtta(&[
        "run",
        pipeline.to_str().unwrap(),
        "--no-progress",
        "--set",
        "tta.method=source",
        "--set",
        "input.require_label=true",
    ]);
    (output, out, started.elapsed().as_secs_f64())
}

/// The panic messages in a stderr (each with the two lines after it), then its tail
/// without backtraces.
fn digest(stderr: &[u8]) -> String {
    let text = String::from_utf8_lossy(stderr);
    let lines: Vec<&str> = text.lines().collect();
    let mut out = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        if line.contains("panicked at") || line.contains("Rayon: detected") {
            out.extend(lines[i..(i + 3).min(lines.len())].iter().copied());
        }
    }
    let plain: Vec<&str> = lines
        .iter()
        .copied()
        .filter(|l| !l.starts_with("  ") && !l.starts_with("stack backtrace"))
        .collect();
    format!(
        "{}\n(tail)\n{}",
        out.join("\n"),
        plain[plain.len().saturating_sub(25)..].join("\n")
    )
}

/// Bisects `members` down to one whose shard alone makes the run fail.
fn bisect(dir: &Path, members: &[&Member], extra: &str) -> String {
    let mut suspects: Vec<&Member> = members.to_vec();
    let mut round = 0;
    while suspects.len() > 1 && round < 16 {
        round += 1;
        let (a, b) = suspects.split_at(suspects.len() / 2);
        let fails = |half: &[&Member], name: &str| {
            let (o, _, _) = run_on(&dir.join(format!("bisect-{round}-{name}")), half, extra);
            !o.status.success()
        };
        if fails(a, "a") {
            suspects = a.to_vec();
        } else if fails(b, "b") {
            suspects = b.to_vec();
        } else {
            return format!(
                "no single half of {} members fails alone (an interaction, or not deterministic); \
                 they are:\n{}",
                suspects.len(),
                suspects
                    .iter()
                    .map(|m| m.description.as_str())
                    .collect::<Vec<_>>()
                    .join("\n")
            );
        }
    }
    match suspects.as_slice() {
        [one] => {
            let (o, _, _) = run_on(&dir.join("bisect-culprit"), &[one], extra);
            format!(
                "this member alone fails the run ({:?}): {}\n--- its run's stderr\n{}",
                o.status,
                one.description,
                digest(&o.stderr)
            )
        }
        _ => "bisection did not converge".into(),
    }
}

/// The columns this test checks, one entry per row.
struct RowView {
    key: String,
    status: String,
    error: Option<String>,
    label: Option<i64>,
    pred_after: Option<i64>,
    corruption: String,
    severity: i32,
}

fn rows(out: &Path) -> Vec<RowView> {
    let mut rows = Vec::new();
    for batch in committed_batches(out, "predictions") {
        let s = |name: &str| column::<StringArray>(&batch, name);
        let (key, status, error, corruption) = (s("key"), s("status"), s("error"), s("corruption"));
        let label = column::<Int64Array>(&batch, "label");
        let pred = column::<Int64Array>(&batch, "pred_after");
        let severity = column::<Int32Array>(&batch, "severity");
        for r in 0..batch.num_rows() {
            rows.push(RowView {
                key: key.value(r).to_string(),
                status: status.value(r).to_string(),
                error: error.is_valid(r).then(|| error.value(r).to_string()),
                label: label.is_valid(r).then(|| label.value(r)),
                pred_after: pred.is_valid(r).then(|| pred.value(r)),
                corruption: corruption.value(r).to_string(),
                severity: severity.value(r),
            });
        }
    }
    rows
}

/// Checks one row against its member; returns the problems found.
fn check_row(m: &Member, r: &RowView) -> Vec<String> {
    let mut problems = Vec::new();
    if !STATUSES.contains(&r.status.as_str()) {
        problems.push(format!("unknown status {:?}", r.status));
    }
    let predicted = PREDICTED.contains(&r.status.as_str());
    let wanted = match m.expect {
        Expect::Decodes => Some(m.label_status),
        Expect::DecodeError => Some("decode_error"),
        Expect::TooLarge => Some("too_large"),
        Expect::Rejected | Expect::Any => None,
    };
    if m.expect == Expect::Rejected && r.status != "decode_error" && r.status != "too_large" {
        problems.push(format!("status {:?}, expected decode_error or too_large", r.status));
    }
    if let Some(w) = wanted {
        if r.status != w {
            problems.push(format!("status {:?}, expected {w:?}", r.status));
        }
    }
    // A decoded image's status is its label's; `diverged` cannot happen with `source`.
    if predicted && r.status != m.label_status {
        problems.push(format!(
            "status {:?} for a decoded image whose label says {:?}",
            r.status, m.label_status
        ));
    }
    if r.status != "ok"
        && r.status != "bad_label"
        && r.status != "missing_label"
        && r.error.as_deref().is_none_or(str::is_empty)
    {
        problems.push(format!("status {:?} without an error message", r.status));
    }
    if predicted != r.pred_after.is_some() {
        problems.push(format!("status {:?} with pred_after {:?}", r.status, r.pred_after));
    }
    if r.label != m.label {
        problems.push(format!("label {:?}, expected {:?}", r.label, m.label));
    }
    problems
}

fn fail_run(seed: u64, what: &str, dir: &Path, members: &[&Member], extra: &str, o: &Output) -> ! {
    eprintln!(
        "mutated_shard: seed {seed}: the {what} failed ({:?}); bisecting...",
        o.status
    );
    let culprit = bisect(&dir.join("bisect"), members, extra);
    panic!(
        "seed {seed} (replay: DTTA_TEST_SEED={seed}): the {what} did not finish cleanly: {:?}\n\
         --- stdout\n{}\n--- stderr\n{}\n--- bisection\n{culprit}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        digest(&o.stderr)
    );
}

#[test]
fn mutated_shard_costs_one_row_per_member_never_the_process() {
    let seed = test_seed("mutated_shard");
    let started = Instant::now();
    let members = members(seed);
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().to_path_buf();
    if std::env::var_os("DTTA_FUZZ_KEEP").is_some() {
        eprintln!("mutated_shard: keeping {}", root.display());
        std::mem::forget(tmp);
    }
    let by_key: BTreeMap<&str, &Member> = members.iter().map(|m| (m.key.as_str(), m)).collect();
    let mut families: BTreeMap<&str, usize> = BTreeMap::new();
    for m in &members {
        *families.entry(m.family).or_default() += 1;
    }
    let bytes: usize = members.iter().map(|m| m.bytes.len()).sum();
    eprintln!(
        "mutated_shard: seed {seed}: {MEMBERS} members ({:.1} MB) built in {:.1} s: {families:?}",
        bytes as f64 / 1e6,
        started.elapsed().as_secs_f64()
    );

    // Run 1: the whole shard.
    let all: Vec<&Member> = members.iter().collect();
    let dir = root.join("plain");
    let (o, out, secs) = run_on(&dir, &all, "");
    if !o.status.success() {
        fail_run(seed, "run of the mutated shard", &dir, &all, "", &o);
    }
    eprintln!(
        "mutated_shard: seed {seed}: run 1 took {secs:.1} s\n{}",
        String::from_utf8_lossy(&o.stdout)
    );
    let committed = committed_files(&out);
    assert_eq!(
        committed.keys().collect::<Vec<_>>(),
        ["fuzz-000000"],
        "seed {seed}: the shard is committed\n{}",
        text(&o)
    );
    let plain = rows(&out);
    let mut problems = Vec::new();
    let mut seen: BTreeMap<&str, &RowView> = BTreeMap::new();
    for r in &plain {
        match by_key.get(r.key.as_str()) {
            None => problems.push(format!("row for unknown key {:?}", r.key)),
            Some(m) => {
                if seen.insert(m.key.as_str(), r).is_some() {
                    problems.push(format!("{}: more than one row", m.key));
                }
                if (r.corruption.as_str(), r.severity) != ("clean", 0) {
                    problems.push(format!(
                        "{}: variant {}/{} without [corrupt]",
                        m.key, r.corruption, r.severity
                    ));
                }
                for p in check_row(m, r) {
                    problems.push(format!("{p}: {} (error: {:?})", m.description, r.error));
                }
            }
        }
    }
    for m in &members {
        if !seen.contains_key(m.key.as_str()) {
            problems.push(format!("no row: {}", m.description));
        }
    }
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    let mut table: BTreeMap<(&str, &str), usize> = BTreeMap::new();
    for r in &plain {
        *counts.entry(r.status.as_str()).or_default() += 1;
        if let Some(m) = by_key.get(r.key.as_str()) {
            *table.entry((m.family, r.status.as_str())).or_default() += 1;
        }
    }
    println!(
        "mutated_shard: seed {seed}: {} rows, per status: {counts:?}",
        plain.len()
    );
    for ((family, status), n) in &table {
        println!("    {family:>20} -> {status:<14} {n}");
    }
    assert!(
        problems.is_empty(),
        "seed {seed} (replay: DTTA_TEST_SEED={seed}): {} problem(s) in {} rows for {MEMBERS} members:\n{}",
        problems.len(),
        plain.len(),
        problems.iter().take(40).cloned().collect::<Vec<_>>().join("\n")
    );
    assert_eq!(plain.len(), MEMBERS, "seed {seed}: one row per member");
    assert!(
        counts.get("ok").copied().unwrap_or(0) > MEMBERS / 5,
        "seed {seed}: {counts:?}"
    );

    // Run 2: `[corrupt]` on, the first CORRUPT_MEMBERS members, of which only the first
    // HEAVY_CORRUPTED camera-size or padded-bomb ones: every image is decoded at full
    // scale and corrupted four times, which costs about a second per heavy member (up
    // to 89 M pixels each).
    let mut heavy_left = HEAVY_CORRUPTED;
    let subset: Vec<&Member> = members
        .iter()
        .filter(|m| {
            let keep = !m.heavy || heavy_left > 0;
            heavy_left -= usize::from(m.heavy && keep);
            keep
        })
        .take(CORRUPT_MEMBERS)
        .collect();
    let dir = root.join("corrupt");
    let (o, out, secs) = run_on(&dir, &subset, CORRUPT);
    if !o.status.success() {
        fail_run(seed, "run with [corrupt] on", &dir, &subset, CORRUPT, &o);
    }
    eprintln!(
        "mutated_shard: seed {seed}: run 2 ([corrupt]) took {secs:.1} s\n{}",
        String::from_utf8_lossy(&o.stdout)
    );
    let corrupt = rows(&out);
    let variants: BTreeSet<(String, i32)> = VARIANTS.iter().map(|(c, s)| (c.to_string(), *s)).collect();
    let mut problems = Vec::new();
    let mut seen: BTreeMap<(&str, &str, i32), &RowView> = BTreeMap::new();
    let mut per_key: BTreeMap<&str, Vec<&RowView>> = BTreeMap::new();
    for r in &corrupt {
        let Some(m) = by_key
            .get(r.key.as_str())
            .filter(|m| subset.iter().any(|s| s.key == m.key))
        else {
            problems.push(format!("row for unknown key {:?}", r.key));
            continue;
        };
        if !variants.contains(&(r.corruption.clone(), r.severity)) {
            problems.push(format!("{}: unexpected variant {}/{}", m.key, r.corruption, r.severity));
        }
        if seen
            .insert((m.key.as_str(), r.corruption.as_str(), r.severity), r)
            .is_some()
        {
            problems.push(format!("{} {}/{}: more than one row", m.key, r.corruption, r.severity));
        }
        per_key.entry(m.key.as_str()).or_default().push(r);
        for p in check_row(m, r) {
            problems.push(format!(
                "{p} ({}/{}): {} (error: {:?})",
                r.corruption, r.severity, m.description, r.error
            ));
        }
    }
    let mut jpeg_verdicts_differ = 0;
    for m in &subset {
        let rows = per_key.get(m.key.as_str()).map(Vec::as_slice).unwrap_or_default();
        if rows.len() != VARIANTS.len() {
            problems.push(format!(
                "{} rows instead of {}: {}",
                rows.len(),
                VARIANTS.len(),
                m.description
            ));
            continue;
        }
        // The sample is decoded once; its status is repeated on every variant.
        if rows
            .iter()
            .any(|r| (&r.status, &r.error) != (&rows[0].status, &rows[0].error))
        {
            problems.push(format!("variants disagree on the status: {}", m.description));
        }
        // Same bytes, same decoder: the same verdict as run 1. Only JPEG may differ (run 1
        // may decode it at a reduced DCT scale with another decoder; a defect there falls
        // back to the full-scale decoder, so a defect is always the same).
        let before = seen_status(&plain, &m.key);
        if before != rows[0].status {
            if m.starts_as_jpeg() && PREDICTED.contains(&before.as_str()) {
                jpeg_verdicts_differ += 1;
            } else {
                problems.push(format!(
                    "status {:?} with [corrupt], {before:?} without: {}",
                    rows[0].status, m.description
                ));
            }
        }
    }
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for r in &corrupt {
        *counts.entry(r.status.as_str()).or_default() += 1;
    }
    println!(
        "mutated_shard: seed {seed}: [corrupt] run: {} rows for {CORRUPT_MEMBERS} members x {} variants, per status: {counts:?}; \
         {jpeg_verdicts_differ} JPEG member(s) decoded by the reduced-scale path only",
        corrupt.len(),
        VARIANTS.len()
    );
    assert!(
        problems.is_empty(),
        "seed {seed} (replay: DTTA_TEST_SEED={seed}): {} problem(s) in the [corrupt] run:\n{}",
        problems.len(),
        problems.iter().take(40).cloned().collect::<Vec<_>>().join("\n")
    );
    assert_eq!(
        corrupt.len(),
        CORRUPT_MEMBERS * VARIANTS.len(),
        "seed {seed}: one row per (member, variant)"
    );
    println!(
        "mutated_shard: seed {seed}: done in {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

fn seen_status(rows: &[RowView], key: &str) -> String {
    rows.iter()
        .find(|r| r.key == key)
        .map(|r| r.status.clone())
        .unwrap_or_default()
}
