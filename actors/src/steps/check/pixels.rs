//! Screenshots compared pixel by pixel: the share of a page that changed between two deploys
//! (`changedPixels` of the browser check), and whether a screenshot shows anything at all.

/// The largest screenshot decoded (width x height): the check's own are 1280 x 800; a PNG
/// claiming more is not ours, and decoding it would take memory without bound.
const MAX_PIXELS: u64 = 4096 * 4096;

#[derive(Debug, thiserror::Error)]
pub enum PixelsError {
    #[error("not a PNG the check can read: {0}")]
    Decode(String),
    #[error("a PNG of {0} pixels is larger than any screenshot the check takes")]
    TooLarge(u64),
}

/// A decoded image: RGBA, 8 bits a channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rgba {
    pub width: u32,
    pub height: u32,
    /// `width * height * 4` bytes, row by row.
    pub data: Vec<u8>,
}

impl Rgba {
    pub fn decode_png(bytes: &[u8]) -> Result<Rgba, PixelsError> {
        let bad = |e: png::DecodingError| PixelsError::Decode(e.to_string());
        let mut decoder = png::Decoder::new(std::io::Cursor::new(bytes));
        // Palettes, 16-bit and gray become 8-bit RGB(A): one layout to compare.
        decoder.set_transformations(png::Transformations::normalize_to_color8());
        let mut reader = decoder.read_info().map_err(bad)?;
        let (w, h) = {
            let info = reader.info();
            (info.width, info.height)
        };
        let pixels = u64::from(w) * u64::from(h);
        if pixels > MAX_PIXELS {
            return Err(PixelsError::TooLarge(pixels));
        }
        let mut buf = vec![
            0;
            reader
                .output_buffer_size()
                .ok_or(PixelsError::TooLarge(pixels))?
        ];
        let frame = reader.next_frame(&mut buf).map_err(bad)?;
        buf.truncate(frame.buffer_size());
        let data = match frame.color_type {
            png::ColorType::Rgba => buf,
            png::ColorType::Rgb => buf
                .chunks_exact(3)
                .flat_map(|p| [p[0], p[1], p[2], 255])
                .collect(),
            png::ColorType::GrayscaleAlpha => buf
                .chunks_exact(2)
                .flat_map(|p| [p[0], p[0], p[0], p[1]])
                .collect(),
            png::ColorType::Grayscale => buf.iter().flat_map(|&g| [g, g, g, 255]).collect(),
            png::ColorType::Indexed => {
                return Err(PixelsError::Decode("palette not expanded".into()));
            }
        };
        Ok(Rgba {
            width: frame.width,
            height: frame.height,
            data,
        })
    }

    fn pixel(&self, x: u32, y: u32) -> &[u8] {
        let i = ((y as usize) * (self.width as usize) + x as usize) * 4;
        &self.data[i..i + 4]
    }

    /// True when every pixel has the same colour: a screenshot of nothing.
    pub fn is_blank(&self) -> bool {
        let Some(first) = self.data.get(..4) else {
            return true;
        };
        self.data.chunks_exact(4).all(|p| p == first)
    }
}

/// The share (0 to 1) of pixels that differ between `before` and `after`. Where the sizes
/// differ, the pixels of either that the other does not have count as changed.
pub fn changed_share(before: &Rgba, after: &Rgba) -> f64 {
    let width = before.width.max(after.width);
    let height = before.height.max(after.height);
    let total = u64::from(width) * u64::from(height);
    if total == 0 {
        return 0.0;
    }
    let (common_w, common_h) = (
        before.width.min(after.width),
        before.height.min(after.height),
    );
    let mut same = 0u64;
    for y in 0..common_h {
        for x in 0..common_w {
            if before.pixel(x, y) == after.pixel(x, y) {
                same += 1;
            }
        }
    }
    (total - same) as f64 / total as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn png(width: u32, height: u32, paint: impl Fn(u32, u32) -> [u8; 4]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut encoder = png::Encoder::new(&mut out, width, height);
        encoder.set_color(png::ColorType::Rgba);
        encoder.set_depth(png::BitDepth::Eight);
        let mut writer = encoder.write_header().unwrap();
        let data: Vec<u8> = (0..height)
            .flat_map(|y| (0..width).map(move |x| (x, y)))
            .flat_map(|(x, y)| paint(x, y))
            .collect();
        writer.write_image_data(&data).unwrap();
        writer.finish().unwrap();
        out
    }

    const WHITE: [u8; 4] = [255, 255, 255, 255];
    const RED: [u8; 4] = [255, 0, 0, 255];

    #[test]
    fn the_same_picture_has_no_changed_pixels() {
        let a = Rgba::decode_png(&png(10, 10, |x, _| if x < 5 { RED } else { WHITE })).unwrap();
        assert_eq!(changed_share(&a, &a.clone()), 0.0);
        assert!(!a.is_blank());
    }

    #[test]
    fn the_share_counts_differing_pixels() {
        let a = Rgba::decode_png(&png(10, 10, |_, _| WHITE)).unwrap();
        let b = Rgba::decode_png(&png(10, 10, |_, y| if y < 3 { RED } else { WHITE })).unwrap();
        assert!((changed_share(&a, &b) - 0.3).abs() < 1e-9);
        assert!(a.is_blank());
        assert!(!b.is_blank());
    }

    #[test]
    fn pixels_only_one_picture_has_count_as_changed() {
        let a = Rgba::decode_png(&png(10, 10, |_, _| WHITE)).unwrap();
        let b = Rgba::decode_png(&png(10, 20, |_, _| WHITE)).unwrap();
        assert!((changed_share(&a, &b) - 0.5).abs() < 1e-9);
    }

    #[test]
    fn what_is_not_a_png_is_an_error() {
        assert!(matches!(
            Rgba::decode_png(b"GIF89a"),
            Err(PixelsError::Decode(_))
        ));
    }
}
