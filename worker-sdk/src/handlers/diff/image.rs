//! PNG decoding and the pixel-diff metrics.

use tokio_util::sync::CancellationToken;

use crate::jobs::DiffResult;

/// Largest image accepted, in pixels (a guard against decompression bombs).
pub const DEFAULT_MAX_PIXELS: u64 = 64 * 1024 * 1024;

/// An image decoded to 8-bit RGBA, row by row.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DecodedImage {
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// `width * height * 4` bytes.
    pub rgba: Vec<u8>,
}

/// Why an image could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// Not a valid PNG.
    #[error("not a decodable PNG: {0}")]
    Png(#[from] png::DecodingError),
    /// Larger than the configured limit.
    #[error("image of {width}x{height} pixels exceeds the limit of {limit} pixels")]
    TooLarge {
        /// Width.
        width: u32,
        /// Height.
        height: u32,
        /// The limit.
        limit: u64,
    },
    /// A color layout the decoder should not produce after normalization.
    #[error("unsupported PNG layout {0:?}")]
    Unsupported(String),
}

impl DecodedImage {
    /// Bytes this image occupies in memory (for the cache bound).
    pub fn memory_bytes(&self) -> usize {
        self.rgba.len() + std::mem::size_of::<Self>()
    }
}

/// Decodes a PNG of any color type and depth to 8-bit RGBA.
pub fn decode_png(bytes: &[u8], max_pixels: u64) -> Result<DecodedImage, DecodeError> {
    let mut decoder = png::Decoder::new(std::io::Cursor::new(bytes));
    decoder.set_transformations(png::Transformations::normalize_to_color8());
    let mut reader = decoder.read_info()?;
    let (width, height) = reader.info().size();
    let pixels = u64::from(width) * u64::from(height);
    if pixels > max_pixels {
        return Err(DecodeError::TooLarge { width, height, limit: max_pixels });
    }
    let size =
        reader.output_buffer_size().ok_or_else(|| DecodeError::Unsupported("output size overflows".to_owned()))?;
    let mut buffer = vec![0; size];
    let frame = reader.next_frame(&mut buffer)?;
    buffer.truncate(frame.buffer_size());
    let (color, depth) = reader.output_color_type();
    if depth != png::BitDepth::Eight {
        return Err(DecodeError::Unsupported(format!("{color:?} at {depth:?}")));
    }
    let pixel_count = usize::try_from(pixels).map_err(|_| DecodeError::Unsupported("too many pixels".to_owned()))?;
    let rgba = match color {
        png::ColorType::Rgba => buffer,
        png::ColorType::Rgb => {
            let mut rgba = Vec::with_capacity(pixel_count * 4);
            for pixel in buffer.chunks_exact(3) {
                rgba.extend_from_slice(&[pixel[0], pixel[1], pixel[2], 255]);
            }
            rgba
        }
        png::ColorType::Grayscale => {
            let mut rgba = Vec::with_capacity(pixel_count * 4);
            for &gray in &buffer {
                rgba.extend_from_slice(&[gray, gray, gray, 255]);
            }
            rgba
        }
        png::ColorType::GrayscaleAlpha => {
            let mut rgba = Vec::with_capacity(pixel_count * 4);
            for pixel in buffer.chunks_exact(2) {
                rgba.extend_from_slice(&[pixel[0], pixel[0], pixel[0], pixel[1]]);
            }
            rgba
        }
        other @ png::ColorType::Indexed => {
            return Err(DecodeError::Unsupported(format!("{other:?} after expansion")));
        }
    };
    if rgba.len() != pixel_count * 4 {
        return Err(DecodeError::Unsupported(format!("decoded {} bytes for {width}x{height} pixels", rgba.len())));
    }
    Ok(DecodedImage { width, height, rgba })
}

/// Encodes 8-bit RGBA as PNG (for tests and tools).
pub fn encode_png(image: &DecodedImage) -> Result<Vec<u8>, png::EncodingError> {
    let mut out = Vec::new();
    {
        let mut encoder = png::Encoder::new(&mut out, image.width, image.height);
        encoder.set_color(png::ColorType::Rgba);
        encoder.set_depth(png::BitDepth::Eight);
        let mut writer = encoder.write_header()?;
        writer.write_image_data(&image.rgba)?;
        writer.finish()?;
    }
    Ok(out)
}

/// Compares two images over the canvas (larger width × larger height).
///
/// - A pixel differs when any RGBA channel differs, or when only one image
///   has it.
/// - `max_channel_difference` is taken over the pixels both images have.
/// - `score = 0.5 * differing fraction + 0.5 * mean channel difference / 255`,
///   where channels of a pixel present in one image only count as 255.
///
/// Returns `None` when `cancel` fired (checked once per row).
pub fn compare(left: &DecodedImage, right: &DecodedImage, cancel: &CancellationToken) -> Option<DiffResult> {
    let canvas_width = left.width.max(right.width);
    let canvas_height = left.height.max(right.height);
    let total = u64::from(canvas_width) * u64::from(canvas_height);
    let mut differing: u64 = 0;
    let mut channel_sum: u64 = 0;
    let mut max_difference: u8 = 0;
    for y in 0..canvas_height {
        if cancel.is_cancelled() {
            return None;
        }
        let left_row = (y < left.height).then(|| row(left, y));
        let right_row = (y < right.height).then(|| row(right, y));
        for x in 0..canvas_width {
            let index = x as usize * 4;
            let left_pixel = left_row.and_then(|row| row.get(index..index + 4));
            let right_pixel = right_row.and_then(|row| row.get(index..index + 4));
            match (left_pixel, right_pixel) {
                (Some(a), Some(b)) => {
                    let mut pixel_differs = false;
                    for channel in 0..4 {
                        let difference = a[channel].abs_diff(b[channel]);
                        if difference > 0 {
                            pixel_differs = true;
                            channel_sum += u64::from(difference);
                            max_difference = max_difference.max(difference);
                        }
                    }
                    differing += u64::from(pixel_differs);
                }
                _ => {
                    differing += 1;
                    channel_sum += 4 * 255;
                }
            }
        }
    }
    let fraction = if total == 0 { 0.0 } else { differing as f64 / total as f64 };
    let mean_channel = if total == 0 { 0.0 } else { channel_sum as f64 / (total as f64 * 4.0) };
    Some(DiffResult {
        differing_pixels: differing,
        total_pixels: total,
        differing_percent: fraction * 100.0,
        max_channel_difference: u32::from(max_difference),
        dimensions_differ: left.width != right.width || left.height != right.height,
        score: 0.5 * fraction + 0.5 * mean_channel / 255.0,
        left_width: left.width,
        left_height: left.height,
        right_width: right.width,
        right_height: right.height,
    })
}

fn row(image: &DecodedImage, y: u32) -> &[u8] {
    let stride = image.width as usize * 4;
    let start = y as usize * stride;
    image.rgba.get(start..start + stride).unwrap_or(&[])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn solid(width: u32, height: u32, pixel: [u8; 4]) -> DecodedImage {
        DecodedImage { width, height, rgba: pixel.repeat((width * height) as usize) }
    }

    #[test]
    fn round_trips_through_png() {
        let mut image = solid(3, 2, [10, 20, 30, 255]);
        image.rgba[4] = 200;
        let bytes = encode_png(&image).expect("encode");
        assert_eq!(decode_png(&bytes, DEFAULT_MAX_PIXELS).expect("decode"), image);
    }

    #[test]
    fn decodes_gray_and_rgb_to_rgba() {
        let mut gray = Vec::new();
        {
            let mut encoder = png::Encoder::new(&mut gray, 2, 1);
            encoder.set_color(png::ColorType::Grayscale);
            encoder.set_depth(png::BitDepth::Eight);
            let mut writer = encoder.write_header().expect("header");
            writer.write_image_data(&[7, 9]).expect("data");
            writer.finish().expect("finish");
        }
        let decoded = decode_png(&gray, DEFAULT_MAX_PIXELS).expect("decode");
        assert_eq!(decoded.rgba, vec![7, 7, 7, 255, 9, 9, 9, 255]);
    }

    #[test]
    fn refuses_garbage_and_huge_images() {
        assert!(matches!(decode_png(b"not a png", DEFAULT_MAX_PIXELS), Err(DecodeError::Png(_))));
        let bytes = encode_png(&solid(10, 10, [0; 4])).expect("encode");
        assert!(matches!(decode_png(&bytes, 99), Err(DecodeError::TooLarge { .. })));
    }

    #[test]
    fn identical_images_score_zero() {
        let image = solid(4, 4, [1, 2, 3, 255]);
        let result = compare(&image, &image, &CancellationToken::new()).expect("not cancelled");
        assert_eq!(result.differing_pixels, 0);
        assert_eq!(result.score, 0.0);
        assert!(!result.dimensions_differ);
    }

    #[test]
    fn one_pixel_off_by_known_amounts() {
        let left = solid(4, 4, [100, 100, 100, 255]);
        let mut right = left.clone();
        right.rgba[0] = 110;
        right.rgba[1] = 80;
        let result = compare(&left, &right, &CancellationToken::new()).expect("not cancelled");
        assert_eq!(result.differing_pixels, 1);
        assert_eq!(result.total_pixels, 16);
        assert_eq!(result.differing_percent, 6.25);
        assert_eq!(result.max_channel_difference, 20);
        let expected = 0.5 * (1.0 / 16.0) + 0.5 * (30.0 / 64.0) / 255.0;
        assert!((result.score - expected).abs() < 1e-12);
    }

    #[test]
    fn different_dimensions_count_the_uncovered_pixels() {
        let left = solid(2, 2, [5, 5, 5, 255]);
        let right = solid(3, 2, [5, 5, 5, 255]);
        let result = compare(&left, &right, &CancellationToken::new()).expect("not cancelled");
        assert!(result.dimensions_differ);
        assert_eq!(result.total_pixels, 6);
        assert_eq!(result.differing_pixels, 2);
        assert_eq!(result.max_channel_difference, 0);
    }

    #[test]
    fn stops_when_cancelled() {
        let image = solid(2, 2, [0; 4]);
        let cancel = CancellationToken::new();
        cancel.cancel();
        assert!(compare(&image, &image, &cancel).is_none());
    }
}
