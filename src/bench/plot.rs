//! A dependency-free SVG line chart for benchmark results: one panel per metric, one line per
//! series (an SFU), subscribers on the x axis.

use std::fmt::Write as _;

/// One line: a name and (x, y) points.
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

/// One chart panel.
pub struct Panel<'a> {
    pub title: &'a str,
    pub y_label: &'a str,
    pub series: Vec<Series>,
}

const W: f64 = 420.0;
const H: f64 = 260.0;
const M: f64 = 50.0;
const COLORS: [&str; 4] = ["#1f6feb", "#d1242f", "#1a7f37", "#8250df"];

fn nice_max(v: f64) -> f64 {
    if v <= 0.0 {
        return 1.0;
    }
    let mag = 10f64.powf(v.log10().floor());
    for m in [1.0, 2.0, 2.5, 5.0, 10.0] {
        if v <= m * mag {
            return m * mag;
        }
    }
    10.0 * mag
}

/// Panels side by side in one SVG document.
pub fn svg(title: &str, x_label: &str, panels: &[Panel<'_>]) -> String {
    let width = W * panels.len() as f64;
    let mut out = String::new();
    let _ = write!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{}" font-family="sans-serif" font-size="11">"#,
        H + 40.0
    );
    let _ = write!(
        out,
        r#"<text x="10" y="16" font-size="13" font-weight="bold">{title}</text>"#
    );
    for (pi, panel) in panels.iter().enumerate() {
        let ox = pi as f64 * W;
        let oy = 30.0;
        let all = panel.series.iter().flat_map(|s| s.points.iter());
        let x_max = nice_max(all.clone().map(|p| p.0).fold(0.0, f64::max));
        let y_max = nice_max(all.map(|p| p.1).fold(0.0, f64::max));
        let px = |x: f64| ox + M + x / x_max * (W - 2.0 * M);
        let py = |y: f64| oy + H - M - y / y_max * (H - 2.0 * M);
        let _ = write!(
            out,
            r#"<text x="{}" y="{}" font-weight="bold">{}</text>"#,
            ox + M,
            oy + 12.0,
            panel.title
        );
        // Axes with five ticks each.
        let _ = write!(
            out,
            r##"<path d="M{} {} V{} H{}" stroke="#555" fill="none"/>"##,
            px(0.0),
            py(y_max),
            py(0.0),
            px(x_max)
        );
        for i in 0..=4 {
            let fy = y_max * i as f64 / 4.0;
            let fx = x_max * i as f64 / 4.0;
            let _ = write!(
                out,
                r##"<text x="{}" y="{}" text-anchor="end">{}</text><text x="{}" y="{}" text-anchor="middle">{}</text>"##,
                px(0.0) - 4.0,
                py(fy) + 4.0,
                trim(fy),
                px(fx),
                py(0.0) + 14.0,
                trim(fx)
            );
        }
        let _ = write!(
            out,
            r#"<text x="{}" y="{}" text-anchor="middle">{x_label}</text><text x="{}" y="{}" transform="rotate(-90 {} {})" text-anchor="middle">{}</text>"#,
            (px(0.0) + px(x_max)) / 2.0,
            py(0.0) + 28.0,
            ox + 12.0,
            (py(0.0) + py(y_max)) / 2.0,
            ox + 12.0,
            (py(0.0) + py(y_max)) / 2.0,
            panel.y_label
        );
        for (si, s) in panel.series.iter().enumerate() {
            let color = COLORS[si % COLORS.len()];
            let pts: Vec<String> = s
                .points
                .iter()
                .map(|&(x, y)| format!("{:.1},{:.1}", px(x), py(y)))
                .collect();
            let _ = write!(
                out,
                r#"<polyline points="{}" fill="none" stroke="{color}" stroke-width="2"/>"#,
                pts.join(" ")
            );
            for &(x, y) in &s.points {
                let _ = write!(
                    out,
                    r#"<circle cx="{:.1}" cy="{:.1}" r="3" fill="{color}"/>"#,
                    px(x),
                    py(y)
                );
            }
            let _ = write!(
                out,
                r#"<text x="{}" y="{}" fill="{color}">{}</text>"#,
                px(x_max) - 90.0,
                oy + 28.0 + 14.0 * si as f64,
                s.name
            );
        }
    }
    out.push_str("</svg>\n");
    out
}

fn trim(v: f64) -> String {
    if v >= 100.0 || v.fract() == 0.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn points_land_inside_their_panel() {
        let doc = svg(
            "t",
            "subscribers",
            &[Panel {
                title: "cpu",
                y_label: "µs",
                series: vec![Series {
                    name: "meridian".into(),
                    points: vec![(1.0, 60.0), (100.0, 10.0)],
                }],
            }],
        );
        assert!(doc.starts_with("<svg") && doc.trim_end().ends_with("</svg>"));
        assert!(doc.contains("<polyline"));
        assert_eq!(nice_max(87.0), 100.0);
        assert_eq!(nice_max(0.3), 0.5);
        // x = 100 maps to the right end of the axis, y = 60 to the top half.
        assert!(doc.contains(&format!("{:.1},", W - M)));
    }
}
