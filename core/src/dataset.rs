//! Reading datasets from disk.
//!
//! Two layouts are understood:
//! - the MVTec AD layout, `<category>/train/good`, `<category>/test/<type>`
//!   and `<category>/ground_truth/<type>/<stem>_mask.png` (a dataset folder
//!   may hold one category or several);
//! - a plain folder of images, for users who have no labels.
//!
//! Masks are binarised at `> 127`. A missing mask is allowed (the image then
//! gets no pixel metrics) and so is an all-zero mask.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::images::{ImageError, ImageLimits, has_image_extension, list_images};

/// The defect-type folder name of normal images.
pub const GOOD: &str = "good";

#[derive(Debug, thiserror::Error)]
pub enum DatasetError {
    #[error("cannot read {path}: {cause}")]
    Io {
        path: PathBuf,
        #[source]
        cause: std::io::Error,
    },
    #[error("{0} is not a folder")]
    NotADirectory(PathBuf),
    #[error(
        "{0} holds no dataset: expected <category>/train/good and <category>/test/<type> folders (MVTec layout)"
    )]
    NoCategories(PathBuf),
    #[error("{0} holds no images (PNG, JPEG, BMP or TIFF)")]
    NoImages(PathBuf),
    #[error("category {category} not found in {root}; it has: {available}")]
    UnknownCategory {
        root: PathBuf,
        category: String,
        available: String,
    },
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error("mask {mask} is {mask_w}×{mask_h} but its image is {image_w}×{image_h}")]
    MaskSize {
        mask: PathBuf,
        mask_w: u32,
        mask_h: u32,
        image_w: u32,
        image_h: u32,
    },
}

/// One test image with its label.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TestSample {
    pub path: PathBuf,
    /// Folder name under `test/`: `good` for normal images.
    pub defect_type: String,
    /// Ground-truth mask, when the dataset has one for this image.
    pub mask: Option<PathBuf>,
}

impl TestSample {
    pub fn is_anomalous(&self) -> bool {
        self.defect_type != GOOD
    }
}

/// One category in the MVTec layout.
#[derive(Debug, Clone)]
pub struct Category {
    pub name: String,
    pub root: PathBuf,
    /// Normal training images, sorted.
    pub train_good: Vec<PathBuf>,
    /// Test images, sorted by defect type then name.
    pub test: Vec<TestSample>,
}

/// A dataset folder: one or more categories.
#[derive(Debug, Clone)]
pub struct Dataset {
    pub root: PathBuf,
    pub categories: Vec<Category>,
}

/// Image counts of one category, as `flawscope dataset-info` prints them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CategorySummary {
    pub category: String,
    pub train_good: usize,
    pub test_good: usize,
    /// Anomalous test images per defect type.
    pub test_defects: BTreeMap<String, usize>,
    pub test_anomalous: usize,
    /// Test images that have a ground-truth mask.
    pub masks: usize,
}

impl Dataset {
    /// Opens `root`, which is either a category folder itself or a folder of
    /// category folders.
    pub fn open(root: &Path) -> Result<Self, DatasetError> {
        if !root.is_dir() {
            return Err(DatasetError::NotADirectory(root.to_path_buf()));
        }
        let categories = if is_category_dir(root) {
            vec![Category::open(root)?]
        } else {
            let mut categories = Vec::new();
            for dir in sorted_subdirs(root)? {
                if is_category_dir(&dir) {
                    categories.push(Category::open(&dir)?);
                }
            }
            categories
        };
        if categories.is_empty() {
            return Err(DatasetError::NoCategories(root.to_path_buf()));
        }
        Ok(Self {
            root: root.to_path_buf(),
            categories,
        })
    }

    /// The category called `name`.
    pub fn category(&self, name: &str) -> Result<&Category, DatasetError> {
        self.categories
            .iter()
            .find(|c| c.name == name)
            .ok_or_else(|| DatasetError::UnknownCategory {
                root: self.root.clone(),
                category: name.to_string(),
                available: self
                    .categories
                    .iter()
                    .map(|c| c.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            })
    }
}

fn is_category_dir(dir: &Path) -> bool {
    dir.join("train").is_dir() || dir.join("test").is_dir()
}

fn sorted_subdirs(dir: &Path) -> Result<Vec<PathBuf>, DatasetError> {
    let io = |cause| DatasetError::Io {
        path: dir.to_path_buf(),
        cause,
    };
    let mut dirs = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io)? {
        let path = entry.map_err(io)?.path();
        if path.is_dir() {
            dirs.push(path);
        }
    }
    dirs.sort();
    Ok(dirs)
}

fn images_in(dir: &Path) -> Result<Vec<PathBuf>, DatasetError> {
    if !dir.is_dir() {
        return Ok(Vec::new());
    }
    list_images(dir).map_err(|cause| DatasetError::Io {
        path: dir.to_path_buf(),
        cause,
    })
}

impl Category {
    /// Reads one category folder in the MVTec layout.
    pub fn open(root: &Path) -> Result<Self, DatasetError> {
        let name = root
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| root.display().to_string());
        let train_good = images_in(&root.join("train").join(GOOD))?;
        let mut test = Vec::new();
        let test_dir = root.join("test");
        if test_dir.is_dir() {
            for type_dir in sorted_subdirs(&test_dir)? {
                let defect_type = type_dir
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                for path in images_in(&type_dir)? {
                    let mask = if defect_type == GOOD {
                        None
                    } else {
                        mask_path(root, &defect_type, &path)
                    };
                    test.push(TestSample {
                        path,
                        defect_type: defect_type.clone(),
                        mask,
                    });
                }
            }
        }
        if train_good.is_empty() && test.is_empty() {
            return Err(DatasetError::NoImages(root.to_path_buf()));
        }
        Ok(Self {
            name,
            root: root.to_path_buf(),
            train_good,
            test,
        })
    }

    pub fn summary(&self) -> CategorySummary {
        let mut test_defects = BTreeMap::new();
        let mut test_good = 0;
        for sample in &self.test {
            if sample.is_anomalous() {
                *test_defects.entry(sample.defect_type.clone()).or_insert(0) += 1;
            } else {
                test_good += 1;
            }
        }
        CategorySummary {
            category: self.name.clone(),
            train_good: self.train_good.len(),
            test_good,
            test_anomalous: test_defects.values().sum(),
            test_defects,
            masks: self.test.iter().filter(|s| s.mask.is_some()).count(),
        }
    }

    /// True when at least one anomalous test image has a mask.
    pub fn has_masks(&self) -> bool {
        self.test.iter().any(|s| s.mask.is_some())
    }
}

fn mask_path(root: &Path, defect_type: &str, image: &Path) -> Option<PathBuf> {
    let stem = image.file_stem()?.to_string_lossy();
    let candidate = root
        .join("ground_truth")
        .join(defect_type)
        .join(format!("{stem}_mask.png"));
    candidate.is_file().then_some(candidate)
}

/// A binary ground-truth mask, row-major, `true` = defective pixel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mask {
    pub width: u32,
    pub height: u32,
    pub pixels: Vec<bool>,
}

impl Mask {
    /// Reads a mask and binarises it at `> 127` (MTD masks have soft edges).
    /// `image_size` is the size of the image it belongs to; they must agree.
    pub fn load(
        path: &Path,
        image_size: (u32, u32),
        limits: &ImageLimits,
    ) -> Result<Self, DatasetError> {
        let rgb = crate::images::load_image(path, limits)?;
        let (w, h) = rgb.dimensions();
        if (w, h) != image_size {
            return Err(DatasetError::MaskSize {
                mask: path.to_path_buf(),
                mask_w: w,
                mask_h: h,
                image_w: image_size.0,
                image_h: image_size.1,
            });
        }
        // to_rgb32f maps 8-bit v to v/255; "> 127" on the 8-bit value is
        // "> 127.5/255" in the unit range.
        let pixels = rgb.pixels().map(|p| p[0] > 127.5 / 255.0).collect();
        Ok(Self {
            width: w,
            height: h,
            pixels,
        })
    }

    /// Resizes to `width × height` by nearest neighbour (for comparing with a
    /// map computed at another resolution). Picks the pixels `image`'s
    /// `FilterType::Nearest` picks, one output pixel at a time: its
    /// two-pass resize holds a `width × source height` buffer, which a mask
    /// of an extreme shape makes huge.
    pub fn resized(&self, width: u32, height: u32) -> Self {
        let pick = |o: u32, from: u32, to: u32| {
            let ratio = from as f32 / to as f32;
            ((o as f32 + 0.5) * ratio)
                .floor()
                .clamp(0.0, from.saturating_sub(1) as f32) as usize
        };
        let pixels = if self.width == 0 || self.height == 0 {
            vec![false; width as usize * height as usize]
        } else {
            let xs: Vec<usize> = (0..width).map(|x| pick(x, self.width, width)).collect();
            (0..height)
                .flat_map(|y| {
                    let row = pick(y, self.height, height) * self.width as usize;
                    xs.iter().map(move |&x| self.pixels[row + x])
                })
                .collect()
        };
        Self {
            width,
            height,
            pixels,
        }
    }
}

/// A plain folder of images with no labels, as a user scoring a production
/// batch has.
pub fn scan_image_folder(dir: &Path) -> Result<Vec<PathBuf>, DatasetError> {
    if !dir.is_dir() {
        return Err(DatasetError::NotADirectory(dir.to_path_buf()));
    }
    let images = images_in(dir)?;
    if images.is_empty() {
        return Err(DatasetError::NoImages(dir.to_path_buf()));
    }
    Ok(images)
}

/// The images in `dir` and all its subfolders (hidden folders skipped;
/// symbolic links followed, loops refused), sorted by path.
pub fn scan_image_tree(dir: &Path) -> Result<Vec<PathBuf>, DatasetError> {
    if !dir.is_dir() {
        return Err(DatasetError::NotADirectory(dir.to_path_buf()));
    }
    let mut images = Vec::new();
    let walk = walkdir::WalkDir::new(dir)
        .follow_links(true)
        .sort_by_file_name()
        .into_iter()
        .filter_entry(|e| e.depth() == 0 || !e.file_name().to_string_lossy().starts_with('.'));
    for entry in walk {
        let entry = entry.map_err(|e| DatasetError::Io {
            path: e.path().unwrap_or(dir).to_path_buf(),
            cause: e.into(),
        })?;
        if entry.file_type().is_file() && has_image_extension(entry.path()) {
            images.push(entry.into_path());
        }
    }
    if images.is_empty() {
        return Err(DatasetError::NoImages(dir.to_path_buf()));
    }
    images.sort();
    Ok(images)
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::GrayImage;

    #[test]
    fn tree_scan_reads_subfolders_and_skips_hidden_ones() {
        let tmp = tempfile::tempdir().unwrap();
        write_png(&tmp.path().join("good/000.png"), 4, 4, 1);
        write_png(&tmp.path().join("crack/000.png"), 4, 4, 1);
        write_png(&tmp.path().join("top.png"), 4, 4, 1);
        write_png(&tmp.path().join(".cache/x.png"), 4, 4, 1);
        let found = scan_image_tree(tmp.path()).unwrap();
        let names: Vec<String> = found
            .iter()
            .map(|p| p.strip_prefix(tmp.path()).unwrap().display().to_string())
            .collect();
        assert_eq!(names, ["crack/000.png", "good/000.png", "top.png"]);
        assert_eq!(scan_image_folder(tmp.path()).unwrap().len(), 1);
    }

    fn write_png(path: &Path, w: u32, h: u32, value: u8) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        GrayImage::from_pixel(w, h, image::Luma([value]))
            .save(path)
            .unwrap();
    }

    #[test]
    fn reads_mvtec_layout_with_missing_and_empty_masks() {
        let tmp = tempfile::tempdir().unwrap();
        let cat = tmp.path().join("widget");
        write_png(&cat.join("train/good/a.png"), 8, 6, 10);
        write_png(&cat.join("train/good/b.png"), 8, 6, 10);
        write_png(&cat.join("test/good/c.png"), 8, 6, 10);
        write_png(&cat.join("test/scratch/d.png"), 8, 6, 200);
        write_png(&cat.join("test/scratch/e.png"), 8, 6, 200);
        write_png(&cat.join("ground_truth/scratch/d_mask.png"), 8, 6, 0);

        let ds = Dataset::open(tmp.path()).unwrap();
        assert_eq!(ds.categories.len(), 1);
        let summary = ds.categories[0].summary();
        assert_eq!(summary.train_good, 2);
        assert_eq!(summary.test_good, 1);
        assert_eq!(summary.test_defects.get("scratch"), Some(&2));
        assert_eq!(summary.masks, 1);

        let d = &ds.categories[0].test[1];
        let mask = Mask::load(d.mask.as_ref().unwrap(), (8, 6), &ImageLimits::default()).unwrap();
        assert!(mask.pixels.iter().all(|p| !p));
        // Opening the category folder directly gives the same category.
        assert_eq!(
            Dataset::open(&cat).unwrap().categories[0].summary(),
            summary
        );
    }

    #[test]
    fn mask_is_binarised_above_127() {
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("m.png");
        let img = GrayImage::from_fn(3, 1, |x, _| image::Luma([[127u8, 128, 255][x as usize]]));
        img.save(&p).unwrap();
        let mask = Mask::load(&p, (3, 1), &ImageLimits::default()).unwrap();
        assert_eq!(mask.pixels, vec![false, true, true]);
        assert!(matches!(
            Mask::load(&p, (4, 1), &ImageLimits::default()),
            Err(DatasetError::MaskSize { .. })
        ));
    }

    #[test]
    fn empty_folders_are_clear_errors() {
        let tmp = tempfile::tempdir().unwrap();
        assert!(matches!(
            scan_image_folder(tmp.path()),
            Err(DatasetError::NoImages(_))
        ));
        assert!(matches!(
            Dataset::open(tmp.path()),
            Err(DatasetError::NoCategories(_))
        ));
    }

    #[test]
    fn mask_resize_picks_what_image_nearest_picks() {
        let mask = Mask {
            width: 13,
            height: 7,
            pixels: (0..91u32).map(|i| (i * 37) % 5 < 2).collect(),
        };
        let grey = GrayImage::from_fn(13, 7, |x, y| {
            image::Luma([if mask.pixels[(y * 13 + x) as usize] {
                255
            } else {
                0
            }])
        });
        for (w, h) in [(13, 7), (5, 3), (40, 9), (7, 30), (1, 1), (100, 2)] {
            let theirs = image::imageops::resize(&grey, w, h, image::imageops::FilterType::Nearest);
            let want: Vec<bool> = theirs.pixels().map(|p| p[0] > 127).collect();
            assert_eq!(mask.resized(w, h).pixels, want, "{w}×{h}");
        }
    }
}
