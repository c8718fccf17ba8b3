//! The published constant tables: ImageNet-C's and CIFAR-10-C's per-severity constants,
//! and which of the two an image gets.

/// Which published constant table an image gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ConstantTable {
    /// make_cifar_c.py, tuned to 32x32.
    Cifar10C,
    /// make_imagenet_c.py, tuned to 224x224.
    ImageNetC,
}

impl ConstantTable {
    /// Short side under 64 pixels: CIFAR-10-C; otherwise ImageNet-C.
    pub(super) fn for_size(width: u32, height: u32) -> ConstantTable {
        if width.min(height) < 64 {
            ConstantTable::Cifar10C
        } else {
            ConstantTable::ImageNetC
        }
    }

    pub(super) fn params(self) -> &'static Params {
        match self {
            ConstantTable::Cifar10C => &CIFAR10_C,
            ConstantTable::ImageNetC => &IMAGENET_C,
        }
    }
}

/// The per-severity constants (`c = [...][severity - 1]`) of one script, field by field in
/// the script's order.
pub(super) struct Params {
    /// gaussian_noise: standard deviation on [0, 1].
    pub(super) gaussian_noise: [f32; 5],
    /// shot_noise: photons per unit intensity, `poisson(x * c) / c`.
    pub(super) shot_noise: [f64; 5],
    /// impulse_noise: fraction of values replaced by 0 or 1.
    pub(super) impulse_noise: [f64; 5],
    /// defocus_blur: (disk radius, alias_blur sigma).
    pub(super) defocus_blur: [(f32, f32); 5],
    /// glass_blur: (gaussian sigma, max_delta, iterations).
    pub(super) glass_blur: [(f64, i64, u32); 5],
    /// motion_blur: ImageMagick (radius, sigma).
    pub(super) motion_blur: [(f64, f64); 5],
    /// zoom_blur: `np.arange(1, stop, step)` as (step, element count); the counts are what
    /// numpy yields, which for some stops includes the stop itself (1.11, 1.06).
    pub(super) zoom_blur: [(f64, usize); 5],
    /// snow: the 7-tuples.
    pub(super) snow: [SnowParams; 5],
    /// frost: (image weight, frost weight), both on 0..=255 values.
    pub(super) frost: [(f32, f32); 5],
    /// Frost-photo pixels per image pixel: CIFAR-10-C shrinks the photos by 0.2.
    pub(super) frost_supersample: usize,
    /// fog: (strength, wibbledecay).
    pub(super) fog: [(f32, f64); 5],
    /// brightness: added to HSV value.
    pub(super) brightness: [f32; 5],
    /// contrast: factor on the deviation from the per-channel mean.
    pub(super) contrast: [f32; 5],
    /// elastic_transform: (alpha, sigma, affine jitter) in units of
    /// `elastic_unit_per_short_side · short side` pixels.
    pub(super) elastic_transform: [(f32, f32, f32); 5],
    /// The elastic unit per pixel of short side: CIFAR's `IMSIZE` is the image size (1);
    /// ImageNet's unit is 244 pixels at 224 (the script's comment: "244 should have been
    /// 224, but ultimately nothing is incorrect").
    pub(super) elastic_unit_per_short_side: f32,
    /// pixelate: shrink factor (f64: `int(size * c)` must truncate like Python's float64).
    pub(super) pixelate: [f64; 5],
    /// jpeg_compression: quality.
    pub(super) jpeg_quality: [u8; 5],
}

/// snow's `c` tuple.
pub(super) struct SnowParams {
    /// Mean and standard deviation of the Gaussian flake layer.
    pub(super) mean: f32,
    pub(super) std: f32,
    /// clipped_zoom factor of the flake layer.
    pub(super) zoom: f64,
    /// Flake values below this become 0.
    pub(super) threshold: f32,
    /// Motion blur (radius, sigma) of the flakes.
    pub(super) blur_radius: f64,
    pub(super) blur_sigma: f64,
    /// Weight of the image against its brightened version.
    pub(super) image_weight: f32,
}

const fn snow_params(c: (f32, f32, f64, f32, f64, f64, f32)) -> SnowParams {
    SnowParams {
        mean: c.0,
        std: c.1,
        zoom: c.2,
        threshold: c.3,
        blur_radius: c.4,
        blur_sigma: c.5,
        image_weight: c.6,
    }
}

/// hendrycks/robustness, ImageNet-C/create_c/make_imagenet_c.py.
static IMAGENET_C: Params = Params {
    gaussian_noise: [0.08, 0.12, 0.18, 0.26, 0.38],
    shot_noise: [60.0, 25.0, 12.0, 5.0, 3.0],
    impulse_noise: [0.03, 0.06, 0.09, 0.17, 0.27],
    defocus_blur: [(3.0, 0.1), (4.0, 0.5), (6.0, 0.5), (8.0, 0.5), (10.0, 0.5)],
    glass_blur: [(0.7, 1, 2), (0.9, 2, 1), (1.0, 2, 3), (1.1, 3, 2), (1.5, 4, 2)],
    motion_blur: [(10.0, 3.0), (15.0, 5.0), (15.0, 8.0), (15.0, 12.0), (20.0, 15.0)],
    // np.arange(1, 1.11, 0.01), (1, 1.16, 0.01), (1, 1.21, 0.02), (1, 1.26, 0.02), (1, 1.31, 0.03)
    zoom_blur: [(0.01, 12), (0.01, 16), (0.02, 11), (0.02, 13), (0.03, 11)],
    snow: [
        snow_params((0.1, 0.3, 3.0, 0.5, 10.0, 4.0, 0.8)),
        snow_params((0.2, 0.3, 2.0, 0.5, 12.0, 4.0, 0.7)),
        snow_params((0.55, 0.3, 4.0, 0.9, 12.0, 8.0, 0.7)),
        snow_params((0.55, 0.3, 4.5, 0.85, 12.0, 8.0, 0.65)),
        snow_params((0.55, 0.3, 2.5, 0.85, 12.0, 12.0, 0.55)),
    ],
    frost: [(1.0, 0.4), (0.8, 0.6), (0.7, 0.7), (0.65, 0.7), (0.6, 0.75)],
    frost_supersample: 1,
    fog: [(1.5, 2.0), (2.0, 2.0), (2.5, 1.7), (2.5, 1.5), (3.0, 1.4)],
    brightness: [0.1, 0.2, 0.3, 0.4, 0.5],
    contrast: [0.4, 0.3, 0.2, 0.1, 0.05],
    elastic_transform: [
        (2.0, 0.7, 0.1),
        (2.0, 0.08, 0.2),
        (0.05, 0.01, 0.02),
        (0.07, 0.01, 0.02),
        (0.12, 0.01, 0.02),
    ],
    elastic_unit_per_short_side: 244.0 / 224.0,
    pixelate: [0.6, 0.5, 0.4, 0.3, 0.25],
    jpeg_quality: [25, 18, 15, 10, 7],
};

/// hendrycks/robustness, ImageNet-C/create_c/make_cifar_c.py.
static CIFAR10_C: Params = Params {
    gaussian_noise: [0.04, 0.06, 0.08, 0.09, 0.10],
    shot_noise: [500.0, 250.0, 100.0, 75.0, 50.0],
    impulse_noise: [0.01, 0.02, 0.03, 0.05, 0.07],
    defocus_blur: [(0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1.0, 0.2), (1.5, 0.1)],
    glass_blur: [(0.05, 1, 1), (0.25, 1, 1), (0.4, 1, 1), (0.25, 1, 2), (0.4, 1, 2)],
    motion_blur: [(6.0, 1.0), (6.0, 1.5), (6.0, 2.0), (8.0, 2.0), (9.0, 2.5)],
    // np.arange(1, 1.06, 0.01), (1, 1.11, 0.01), (1, 1.16, 0.01), (1, 1.21, 0.01), (1, 1.26, 0.01)
    zoom_blur: [(0.01, 7), (0.01, 12), (0.01, 16), (0.01, 21), (0.01, 26)],
    snow: [
        snow_params((0.1, 0.2, 1.0, 0.6, 8.0, 3.0, 0.95)),
        snow_params((0.1, 0.2, 1.0, 0.5, 10.0, 4.0, 0.9)),
        snow_params((0.15, 0.3, 1.75, 0.55, 10.0, 4.0, 0.9)),
        snow_params((0.25, 0.3, 2.25, 0.6, 12.0, 6.0, 0.85)),
        snow_params((0.3, 0.3, 1.25, 0.65, 14.0, 12.0, 0.8)),
    ],
    frost: [(1.0, 0.2), (1.0, 0.3), (0.9, 0.4), (0.85, 0.4), (0.75, 0.45)],
    frost_supersample: 5,
    fog: [(0.2, 3.0), (0.5, 3.0), (0.75, 2.5), (1.0, 2.0), (1.5, 1.75)],
    brightness: [0.05, 0.1, 0.15, 0.2, 0.3],
    contrast: [0.75, 0.5, 0.4, 0.3, 0.15],
    elastic_transform: [
        (0.0, 0.0, 0.08),
        (0.05, 0.2, 0.07),
        (0.08, 0.06, 0.06),
        (0.1, 0.04, 0.05),
        (0.1, 0.03, 0.03),
    ],
    elastic_unit_per_short_side: 1.0,
    pixelate: [0.95, 0.9, 0.85, 0.75, 0.65],
    jpeg_quality: [80, 65, 58, 50, 40],
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_constant_table_switches_at_a_short_side_of_64() {
        assert_eq!(ConstantTable::for_size(28, 28), ConstantTable::Cifar10C);
        assert_eq!(ConstantTable::for_size(63, 500), ConstantTable::Cifar10C);
        assert_eq!(ConstantTable::for_size(500, 63), ConstantTable::Cifar10C);
        assert_eq!(ConstantTable::for_size(64, 64), ConstantTable::ImageNetC);
        assert_eq!(ConstantTable::for_size(500, 375), ConstantTable::ImageNetC);
    }
}
