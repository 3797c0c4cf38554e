//! A small SVG line chart for the benchmark report: no plotting crate, just paths and labels.

/// One line of the chart: its name, colour and (x, y) points.
pub struct Series<'a> {
    /// Legend text.
    pub name: &'a str,
    /// CSS colour.
    pub colour: &'a str,
    /// Points, x ascending.
    pub points: &'a [(f64, f64)],
}

fn nice_max(v: f64) -> f64 {
    if v <= 0.0 {
        return 1.0;
    }
    let magnitude = 10f64.powf(v.log10().floor());
    [1.0, 2.0, 2.5, 5.0, 10.0].iter().map(|m| m * magnitude).find(|m| *m >= v).unwrap_or(10.0 * magnitude)
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

/// Draws `series` on shared axes starting at zero.
pub fn line_chart(title: &str, x_label: &str, y_label: &str, series: &[Series<'_>]) -> String {
    let (w, h, left, right, top, bottom) = (720.0, 400.0, 70.0, 20.0, 40.0, 50.0);
    let all = series.iter().flat_map(|s| s.points.iter());
    let (x_max, y_max) = all.fold((0f64, 0f64), |(x, y), p| (x.max(p.0), y.max(p.1)));
    let (x_max, y_max) = (nice_max(x_max), nice_max(y_max));
    let px = |x: f64| left + x / x_max * (w - left - right);
    let py = |y: f64| h - bottom - y / y_max * (h - top - bottom);
    let mut out = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"{left}\" y=\"22\" font-size=\"15\">{}</text>\n",
        escape(title)
    );
    for i in 0..=5 {
        let (fx, fy) = (x_max * i as f64 / 5.0, y_max * i as f64 / 5.0);
        out += &format!(
            "<line x1=\"{left}\" x2=\"{}\" y1=\"{y:.1}\" y2=\"{y:.1}\" stroke=\"#ddd\"/>\
             <text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{fy}</text>\n\
             <text x=\"{x:.1}\" y=\"{}\" text-anchor=\"middle\">{fx}</text>\n",
            w - right,
            left - 6.0,
            py(fy) + 4.0,
            h - bottom + 16.0,
            y = py(fy),
            x = px(fx),
        );
    }
    out += &format!(
        "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{}</text>\n\
         <text transform=\"translate(16 {}) rotate(-90)\" text-anchor=\"middle\">{}</text>\n",
        (left + w - right) / 2.0,
        h - 12.0,
        escape(x_label),
        (top + h - bottom) / 2.0,
        escape(y_label)
    );
    for (i, s) in series.iter().enumerate() {
        let d: Vec<String> = s.points.iter().map(|(x, y)| format!("{:.1},{:.1}", px(*x), py(*y))).collect();
        out += &format!(
            "<polyline fill=\"none\" stroke=\"{}\" stroke-width=\"2\" points=\"{}\"/>\n\
             <rect x=\"{}\" y=\"{}\" width=\"12\" height=\"3\" fill=\"{}\"/><text x=\"{}\" y=\"{}\">{}</text>\n",
            s.colour,
            d.join(" "),
            left + 10.0,
            top + 8.0 + 16.0 * i as f64,
            s.colour,
            left + 28.0,
            top + 13.0 + 16.0 * i as f64,
            escape(s.name)
        );
    }
    out + "</svg>\n"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn axes_round_up_and_lines_are_drawn() {
        assert_eq!(nice_max(0.0), 1.0);
        assert_eq!(nice_max(66.0), 100.0);
        assert_eq!(nice_max(1000.0), 1000.0);
        assert_eq!(nice_max(1001.0), 2000.0);
        let pts = [(0.0, 0.0), (10.0, 500.0), (66.0, 1000.0)];
        let svg = line_chart("a <b>", "s", "Ready", &[Series { name: "off", colour: "#1f77b4", points: &pts }]);
        assert!(svg.starts_with("<svg") && svg.ends_with("</svg>\n"));
        assert_eq!(svg.matches("<polyline").count(), 1);
        assert!(svg.contains("a &lt;b&gt;"));
        // The last point sits at 66/100 of the x axis and at the top of the y axis (1000 of 1000).
        assert!(svg.contains("485.8,40.0"), "{svg}");
    }
}
