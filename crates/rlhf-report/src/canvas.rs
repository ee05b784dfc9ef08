//! The PNG canvas: plotters' bitmap backend with text drawn from the embedded DejaVu Sans.
//!
//! plotters' own ab_glyph text drops each glyph's left side bearing and rounds every glyph's
//! top separately, so "10" reads as "1 0" and decimal points float; this backend lays out a
//! whole string on one baseline instead. Sizes still come from plotters' ab_glyph metrics
//! (the same advances), so its label areas fit the text drawn here.

use ab_glyph::{point, Font, FontRef, PxScale, ScaleFont};
use plotters::prelude::BitMapBackend;
use plotters_backend::text_anchor::{HPos, VPos};
use plotters_backend::{
    BackendColor, BackendCoord, BackendStyle, BackendTextStyle, DrawingBackend, DrawingErrorKind,
};

/// The embedded font's bytes: DejaVu Sans (Bitstream Vera licence), from the `dejavu` crate.
pub fn font_bytes() -> &'static [u8] {
    dejavu::sans::regular()
}

fn font() -> &'static FontRef<'static> {
    static FONT: std::sync::OnceLock<FontRef<'static>> = std::sync::OnceLock::new();
    FONT.get_or_init(|| FontRef::try_from_slice(font_bytes()).expect("DejaVu Sans is a valid TTF"))
}

/// A bitmap backend whose text is laid out on a shared baseline.
pub struct Png<'a>(pub BitMapBackend<'a>);

type Res<E> = Result<(), DrawingErrorKind<E>>;

impl<'a> DrawingBackend for Png<'a> {
    type ErrorType = <BitMapBackend<'a> as DrawingBackend>::ErrorType;

    fn get_size(&self) -> (u32, u32) {
        self.0.get_size()
    }
    fn ensure_prepared(&mut self) -> Res<Self::ErrorType> {
        self.0.ensure_prepared()
    }
    fn present(&mut self) -> Res<Self::ErrorType> {
        self.0.present()
    }
    fn draw_pixel(&mut self, p: BackendCoord, c: BackendColor) -> Res<Self::ErrorType> {
        self.0.draw_pixel(p, c)
    }
    fn draw_line<S: BackendStyle>(
        &mut self,
        from: BackendCoord,
        to: BackendCoord,
        style: &S,
    ) -> Res<Self::ErrorType> {
        self.0.draw_line(from, to, style)
    }
    fn draw_rect<S: BackendStyle>(
        &mut self,
        ul: BackendCoord,
        br: BackendCoord,
        style: &S,
        fill: bool,
    ) -> Res<Self::ErrorType> {
        self.0.draw_rect(ul, br, style, fill)
    }
    fn draw_path<S: BackendStyle, I: IntoIterator<Item = BackendCoord>>(
        &mut self,
        path: I,
        style: &S,
    ) -> Res<Self::ErrorType> {
        self.0.draw_path(path, style)
    }
    fn draw_circle<S: BackendStyle>(
        &mut self,
        center: BackendCoord,
        radius: u32,
        style: &S,
        fill: bool,
    ) -> Res<Self::ErrorType> {
        self.0.draw_circle(center, radius, style, fill)
    }
    fn fill_polygon<S: BackendStyle, I: IntoIterator<Item = BackendCoord>>(
        &mut self,
        vert: I,
        style: &S,
    ) -> Res<Self::ErrorType> {
        self.0.fill_polygon(vert, style)
    }
    fn blit_bitmap(
        &mut self,
        pos: BackendCoord,
        size: (u32, u32),
        src: &[u8],
    ) -> Res<Self::ErrorType> {
        self.0.blit_bitmap(pos, size, src)
    }

    fn draw_text<S: BackendTextStyle>(
        &mut self,
        text: &str,
        style: &S,
        pos: BackendCoord,
    ) -> Res<Self::ErrorType> {
        let color = style.color();
        if color.alpha == 0.0 {
            return Ok(());
        }
        // The box plotters reserved for this text (ab_glyph metrics: advances wide,
        // size / 1.24 high); anchor it as plotters' default `draw_text` does.
        let ((x0, y0), (x1, y1)) = style
            .layout_box(text)
            .map_err(|e| DrawingErrorKind::FontError(Box::new(e)))?;
        let (width, height) = (x1 - x0, y1 - y0);
        let dx = match style.anchor().h_pos {
            HPos::Left => 0,
            HPos::Right => -width,
            HPos::Center => -width / 2,
        };
        let dy = match style.anchor().v_pos {
            VPos::Top => 0,
            VPos::Center => -height / 2,
            VPos::Bottom => -height,
        };
        let font = font().as_scaled(PxScale::from(style.size() as f32));
        // One baseline for the whole string, placed so capitals and digits sit centred in
        // the box (what a tick label's centre anchor means to a reader).
        let cap = font
            .outline_glyph(font.scaled_glyph('H'))
            .map_or(font.ascent(), |g| -g.px_bounds().min.y);
        let baseline = (height as f32 + cap) / 2.0;
        let trans = style.transform();
        let (w, h) = self.get_size();
        let mut caret = 0.0f32;
        let mut prev = None;
        for c in text.chars() {
            let id = font.glyph_id(c);
            if let Some(p) = prev {
                caret += font.kern(p, id);
            }
            prev = Some(id);
            let glyph = id.with_scale_and_position(font.scale(), point(caret, baseline));
            caret += font.h_advance(id);
            let Some(outline) = font.outline_glyph(glyph) else {
                continue; // a space
            };
            let b = outline.px_bounds();
            let mut result = Ok(());
            outline.draw(|gx, gy, coverage| {
                if result.is_err() || coverage <= 0.0 {
                    return;
                }
                let (x, y) = (b.min.x as i32 + gx as i32, b.min.y as i32 + gy as i32);
                let (x, y) = trans.transform(x + dx, y + dy);
                let (x, y) = (pos.0 + x, pos.1 + y);
                if x >= 0 && y >= 0 && x < w as i32 && y < h as i32 {
                    let alpha = color.alpha * f64::from(coverage.min(1.0));
                    result = self.0.draw_pixel((x, y), BackendColor { alpha, ..color });
                }
            });
            result?;
        }
        Ok(())
    }
}
