//! The quickstart's own image-question set: one coloured shape per image, and two questions
//! whose answers need the image (its colour, its shape). Written as PNG files plus `jsonl` splits,
//! so that it goes through exactly the pipeline users' data goes through.

use crate::rng::Rng;
use anyhow::{Context, Result};
use serde_json::json;
use std::io::Write;
use std::path::Path;

pub const COLOURS: &[(&str, [u8; 3])] =
    &[("red", [220, 40, 40]), ("green", [40, 170, 60]), ("blue", [40, 70, 220]), ("yellow", [230, 210, 40])];
pub const SHAPES: &[&str] = &["circle", "square", "triangle"];

fn inside(shape: &str, x: f64, y: f64, cx: f64, cy: f64, r: f64) -> bool {
    let (dx, dy) = (x - cx, y - cy);
    match shape {
        "circle" => dx * dx + dy * dy <= r * r,
        "square" => dx.abs() <= r * 0.85 && dy.abs() <= r * 0.85,
        _ => {
            // Upward triangle with apex at (cx, cy - r) and base at cy + r.
            let t = (dy + r) / (2.0 * r);
            (0.0..=1.0).contains(&t) && dx.abs() <= t * r
        }
    }
}

/// Renders one `size`×`size` RGB image.
pub fn render(size: usize, shape: &str, colour: [u8; 3], rng: &mut Rng) -> Vec<u8> {
    let s = size as f64;
    let r = s * (0.22 + 0.12 * rng.uniform());
    let cx = r + (s - 2.0 * r) * rng.uniform();
    let cy = r + (s - 2.0 * r) * rng.uniform();
    let bg = 235.0 + 15.0 * rng.uniform();
    let mut px = vec![0u8; size * size * 3];
    for y in 0..size {
        for x in 0..size {
            // 2x2 supersampling for smooth edges.
            let mut cover = 0.0;
            for (ox, oy) in [(0.25, 0.25), (0.75, 0.25), (0.25, 0.75), (0.75, 0.75)] {
                if inside(shape, x as f64 + ox, y as f64 + oy, cx, cy, r) {
                    cover += 0.25;
                }
            }
            for c in 0..3 {
                let noise = (rng.uniform() - 0.5) * 10.0;
                let v = bg * (1.0 - cover) + colour[c] as f64 * cover + noise;
                px[(y * size + x) * 3 + c] = v.clamp(0.0, 255.0) as u8;
            }
        }
    }
    px
}

/// Writes `images/*.png`, `shapes.train.jsonl` and `shapes.test.jsonl` under `dir` and returns
/// the path of `shapes.jsonl` (the `jsonl:` data spec).
pub fn write_shapes(
    dir: &Path,
    n_train_images: usize,
    n_test_images: usize,
    size: usize,
    seed: u64,
) -> Result<std::path::PathBuf> {
    let img_dir = dir.join("images");
    std::fs::create_dir_all(&img_dir).with_context(|| format!("{}: cannot create", img_dir.display()))?;
    let mut rng = Rng::derive(seed, "shapes");
    for (split, n) in [("train", n_train_images), ("test", n_test_images)] {
        let mut lines = Vec::new();
        for i in 0..n {
            let shape = SHAPES[rng.below(SHAPES.len())];
            let (cname, rgb) = COLOURS[rng.below(COLOURS.len())];
            let px = render(size, shape, rgb, &mut rng);
            let name = format!("{split}_{i:05}.png");
            let img = image::RgbImage::from_raw(size as u32, size as u32, px).unwrap();
            img.save(img_dir.join(&name)).with_context(|| format!("writing {name}"))?;
            for (q, a, t) in
                [("what color is the shape?", cname, "colour"), ("what shape is in the image?", shape, "shape")]
            {
                lines.push(
                    json!({"image": format!("images/{name}"), "question": q, "answer": a, "type": t}).to_string(),
                );
            }
        }
        let f = dir.join(format!("shapes.{split}.jsonl"));
        let mut w = std::fs::File::create(&f).with_context(|| format!("{}: cannot create", f.display()))?;
        for l in lines {
            writeln!(w, "{l}")?;
        }
    }
    let main = dir.join("shapes.jsonl");
    std::fs::copy(dir.join("shapes.train.jsonl"), &main)?;
    Ok(main)
}
