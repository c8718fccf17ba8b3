//! Dense labels (segmentation masks, depth maps): decoded from their PNG members and
//! brought into the classifier view's geometry, so that label pixel `(y, x)` is the
//! ground truth of output pixel `(y, x)` once the model's output is upsampled to the
//! crop.
//!
//! Invariants: a label is the size of its image or it is refused (`bad_label`); it
//! follows the image's resize and center crop with nearest-neighbour sampling (a class
//! index or a depth is never blended with its neighbour); corruptions never touch it.

use std::io::Cursor;

use image::{DynamicImage, ImageReader};
use serde::{Deserialize, Serialize};

use super::ClassifierView;
use crate::sample::{Defect, DenseMembers, Status, Task};

/// `[label]`: how dense labels are encoded.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct LabelConfig {
    /// Metres per unit of a `depth.png` value (0.001: millimetres).
    pub depth_scale: f64,
}

impl Default for LabelConfig {
    fn default() -> Self {
        LabelConfig { depth_scale: 0.001 }
    }
}

/// The class index that marks a segmentation pixel as unlabelled.
pub const IGNORE: u8 = 255;

/// A dense label in the classifier view's geometry: `crop x crop`, row-major.
#[derive(Debug, Clone, PartialEq)]
pub enum DenseLabel {
    /// One class index per pixel; [`IGNORE`] where unlabelled.
    Segmentation(Vec<u8>),
    /// Depth in metres per pixel; 0 where invalid.
    Depth(Vec<f32>),
}

/// Reads the sample's label for `task`, or `None` when the task is not dense or the
/// sample has no label member. `image_size` is the decoded image's full-scale size.
pub fn read_label(
    members: &DenseMembers,
    task: Task,
    labels: &LabelConfig,
    image_size: (u32, u32),
    view: &ClassifierView,
) -> Result<Option<DenseLabel>, Defect> {
    let (member, bytes) = match task {
        Task::Classification => return Ok(None),
        Task::Segmentation => ("seg.png", &members.seg),
        Task::Depth => ("depth.png", &members.depth),
    };
    let Some(bytes) = bytes else { return Ok(None) };
    let bad = |m: String| Defect::new(Status::BadLabel, format!("{member}: {m}"));
    let reader = || {
        ImageReader::new(Cursor::new(&bytes[..]))
            .with_guessed_format()
            .map_err(|e| bad(e.to_string()))
    };
    // The header's size is checked before anything is decoded: a label can only be as
    // large as its image, which passed `limits.max_pixels`.
    let size = reader()?
        .into_dimensions()
        .map_err(|e| bad(format!("cannot decode: {e}")))?;
    if size != image_size {
        return Err(bad(format!(
            "{}x{} label for a {}x{} image",
            size.0, size.1, image_size.0, image_size.1
        )));
    }
    let decoded = reader()?.decode().map_err(|e| bad(format!("cannot decode: {e}")))?;
    if (decoded.width(), decoded.height()) != image_size {
        return Err(bad("the decoded size differs from the header's".into()));
    }
    let label = match (task, decoded) {
        (Task::Segmentation, DynamicImage::ImageLuma8(l)) => {
            DenseLabel::Segmentation(crop_nearest(l.as_raw(), size, view, IGNORE))
        }
        (Task::Depth, DynamicImage::ImageLuma16(l)) => {
            let scale = labels.depth_scale;
            let metres: Vec<f32> = l.as_raw().iter().map(|&v| (v as f64 * scale) as f32).collect();
            DenseLabel::Depth(crop_nearest(&metres, size, view, 0.0))
        }
        (_, other) => {
            let wanted = if task == Task::Segmentation {
                "8-bit grayscale (one class index per pixel)"
            } else {
                "16-bit grayscale (depth in units of label.depth_scale metres)"
            };
            return Err(bad(format!("must be {wanted}, not {:?}", other.color())));
        }
    };
    Ok(Some(label))
}

/// Samples `values` (`width x height`, row-major) at the centre of each of the view's
/// `crop x crop` output pixels within its crop window: nearest neighbour, the same
/// window the image's resize and crop use. `outside` fills pixels that map outside the
/// label (none with a window inside the image).
pub fn crop_nearest<T: Copy>(values: &[T], (width, height): (u32, u32), view: &ClassifierView, outside: T) -> Vec<T> {
    let (left, top, w, h) = view.crop_window(width, height);
    let side = view.crop as usize;
    let mut out = Vec::with_capacity(side * side);
    for i in 0..side {
        let y = (top + (i as f64 + 0.5) * h / side as f64).floor();
        for j in 0..side {
            let x = (left + (j as f64 + 0.5) * w / side as f64).floor();
            let inside = x >= 0.0 && y >= 0.0 && (x as u32) < width && (y as u32) < height;
            out.push(if inside {
                values[y as usize * width as usize + x as usize]
            } else {
                outside
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::Channels;

    fn view(resize: u32, crop: u32) -> ClassifierView {
        ClassifierView {
            channels: Channels::Gray,
            resize,
            crop,
            mean: vec![0.5],
            std: vec![0.5],
        }
    }

    fn png(img: DynamicImage) -> bytes::Bytes {
        let mut out = Cursor::new(Vec::new());
        img.write_to(&mut out, image::ImageFormat::Png).unwrap();
        out.into_inner().into()
    }

    fn seg(w: u32, h: u32, f: impl Fn(u32, u32) -> u8) -> DenseMembers {
        let img = image::GrayImage::from_fn(w, h, |x, y| image::Luma([f(x, y)]));
        DenseMembers {
            seg: Some(png(DynamicImage::ImageLuma8(img))),
            depth: None,
        }
    }

    #[test]
    fn same_size_is_the_label_itself() {
        let m = seg(4, 4, |x, y| (y * 4 + x) as u8);
        let l = read_label(&m, Task::Segmentation, &LabelConfig::default(), (4, 4), &view(4, 4)).unwrap();
        assert_eq!(l, Some(DenseLabel::Segmentation((0..16).collect())));
    }

    #[test]
    fn follows_the_resize_and_center_crop_with_nearest_neighbours() {
        // 8x4 image, resize shorter side to 2 (4x2), crop 2: the middle half of the columns.
        let m = seg(8, 4, |x, _| x as u8);
        let l = read_label(&m, Task::Segmentation, &LabelConfig::default(), (8, 4), &view(2, 2)).unwrap();
        // Window: left 2, width 4 (x 2..6); output pixel centres at x = 3 and 5.
        assert_eq!(l, Some(DenseLabel::Segmentation(vec![3, 5, 3, 5])));
        // Upscaling repeats labels, never blends them.
        let l = read_label(&m, Task::Segmentation, &LabelConfig::default(), (8, 4), &view(8, 8)).unwrap();
        let Some(DenseLabel::Segmentation(v)) = l else { panic!() };
        assert_eq!(&v[..8], &[2, 2, 3, 3, 4, 4, 5, 5]);
    }

    #[test]
    fn depth_is_read_in_metres() {
        let img = image::ImageBuffer::<image::Luma<u16>, Vec<u16>>::from_fn(2, 2, |x, y| {
            image::Luma([(1000 * (x + 2 * y)) as u16 + 500])
        });
        let m = DenseMembers {
            seg: None,
            depth: Some(png(DynamicImage::ImageLuma16(img))),
        };
        let l = read_label(&m, Task::Depth, &LabelConfig::default(), (2, 2), &view(2, 2)).unwrap();
        assert_eq!(l, Some(DenseLabel::Depth(vec![0.5, 1.5, 2.5, 3.5])));
        let mm = LabelConfig { depth_scale: 0.0001 };
        let Some(DenseLabel::Depth(d)) = read_label(&m, Task::Depth, &mm, (2, 2), &view(2, 2)).unwrap() else {
            panic!()
        };
        assert!((d[3] - 0.35).abs() < 1e-6);
    }

    #[test]
    fn bad_labels_say_why() {
        let cfg = LabelConfig::default();
        let err = |m: &DenseMembers, task, size| read_label(m, task, &cfg, size, &view(4, 4)).unwrap_err();
        let m = seg(4, 4, |_, _| 1);
        let e = err(&m, Task::Segmentation, (4, 5));
        assert_eq!(e.status, Status::BadLabel);
        assert_eq!(e.message, "seg.png: 4x4 label for a 4x5 image");
        // An 8-bit map is not a depth map.
        let as_depth = DenseMembers {
            seg: None,
            depth: m.seg.clone(),
        };
        assert!(err(&as_depth, Task::Depth, (4, 4))
            .message
            .starts_with("depth.png: must be 16-bit grayscale"));
        let garbage = DenseMembers {
            seg: Some(bytes::Bytes::from_static(b"\x89PNG\r\n\x1a\nnot really")),
            depth: None,
        };
        assert!(err(&garbage, Task::Segmentation, (4, 4))
            .message
            .starts_with("seg.png: cannot decode"));
        // No member, or a classification task: no label and no problem.
        assert_eq!(
            read_label(&DenseMembers::default(), Task::Depth, &cfg, (4, 4), &view(4, 4)),
            Ok(None)
        );
        assert_eq!(
            read_label(&m, Task::Classification, &cfg, (4, 4), &view(4, 4)),
            Ok(None)
        );
    }
}
