//! PNG files: writing results with their generation parameters, reading init images.

use std::fs::File;
use std::io::BufWriter;
use std::path::{Path, PathBuf};

use sdxl_core::pipeline::RgbImage;

/// Writes `image` to `path` with a `parameters` text chunk (the format other SDXL tools read).
/// The file is written next to its destination and renamed, so a failure leaves nothing
/// half-written.
pub fn write_png(path: &Path, image: &RgbImage, parameters: &str) -> Result<(), String> {
    let tmp = tmp_path(path);
    let result = write_to(&tmp, image, parameters)
        .and_then(|()| std::fs::rename(&tmp, path).map_err(|e| e.to_string()));
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(|e| format!("cannot write {}: {e}", path.display()))
}

fn tmp_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".partial");
    path.with_file_name(name)
}

fn write_to(path: &Path, image: &RgbImage, parameters: &str) -> Result<(), String> {
    let file = File::create(path).map_err(|e| e.to_string())?;
    let mut encoder = png::Encoder::new(
        BufWriter::new(file),
        image.width as u32,
        image.height as u32,
    );
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    let text_result = if parameters.is_ascii() {
        encoder.add_text_chunk("parameters".into(), parameters.into())
    } else {
        encoder.add_itxt_chunk("parameters".into(), parameters.into())
    };
    text_result.map_err(|e| e.to_string())?;
    let mut writer = encoder.write_header().map_err(|e| e.to_string())?;
    writer
        .write_image_data(&image.data)
        .map_err(|e| e.to_string())?;
    writer.finish().map_err(|e| e.to_string())
}

/// Reads a PNG as 8-bit RGB (alpha dropped, grey expanded).
pub fn read_png(path: &Path) -> Result<RgbImage, String> {
    let fail = |e: &dyn std::fmt::Display| format!("cannot read PNG {}: {e}", path.display());
    let file = File::open(path).map_err(|e| fail(&e))?;
    let mut decoder = png::Decoder::new(std::io::BufReader::new(file));
    decoder.set_transformations(png::Transformations::EXPAND | png::Transformations::STRIP_16);
    let mut reader = decoder.read_info().map_err(|e| fail(&e))?;
    let size = reader
        .output_buffer_size()
        .ok_or_else(|| fail(&"image too large"))?;
    let mut buf = vec![0; size];
    let info = reader.next_frame(&mut buf).map_err(|e| fail(&e))?;
    let (w, h) = (info.width as usize, info.height as usize);
    let pixels = &buf[..info.buffer_size()];
    let rgb: Vec<u8> = match info.color_type {
        png::ColorType::Rgb => pixels.to_vec(),
        png::ColorType::Rgba => pixels
            .chunks_exact(4)
            .flat_map(|p| [p[0], p[1], p[2]])
            .collect(),
        png::ColorType::Grayscale => pixels.iter().flat_map(|&g| [g, g, g]).collect(),
        png::ColorType::GrayscaleAlpha => pixels
            .chunks_exact(2)
            .flat_map(|p| [p[0], p[0], p[0]])
            .collect(),
        png::ColorType::Indexed => return Err(fail(&"palette image was not expanded")),
    };
    RgbImage::new(w, h, rgb).map_err(|e| fail(&e))
}
