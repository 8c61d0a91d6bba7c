//! A dependency-free SVG chart for `loadgen`: end-to-end latency of each message over time
//! (dots, left axis) and completions per second (line, right axis).

/// `points`: (seconds since the start, latency in ms) of each finished message.
pub fn render(points: &[(f64, f64)]) -> String {
    let (w, h, left, right, top, bottom) = (900.0, 420.0, 70.0, 70.0, 40.0, 50.0);
    let plot_w = w - left - right;
    let plot_h = h - top - bottom;
    let t_max = points.iter().map(|p| p.0).fold(1.0_f64, f64::max).ceil();
    let l_max = nice(points.iter().map(|p| p.1).fold(1.0_f64, f64::max));
    // Completions per whole second.
    let buckets = t_max as usize + 1;
    let mut per_sec = vec![0u32; buckets];
    for (t, _) in points {
        per_sec[(*t as usize).min(buckets - 1)] += 1;
    }
    let r_max = nice(per_sec.iter().copied().max().unwrap_or(1).max(1) as f64);
    let x = |t: f64| left + t / t_max * plot_w;
    let y_l = |v: f64| top + plot_h - v / l_max * plot_h;
    let y_r = |v: f64| top + plot_h - v / r_max * plot_h;

    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"{}\" y=\"22\" text-anchor=\"middle\" font-size=\"15\">edit-worker loadgen: {} messages</text>\n",
        w / 2.0,
        points.len()
    );
    for i in 0..=4 {
        let f = i as f64 / 4.0;
        let yy = top + plot_h - f * plot_h;
        svg += &format!(
            "<line x1=\"{left}\" y1=\"{yy}\" x2=\"{}\" y2=\"{yy}\" stroke=\"#ddd\"/>\n",
            left + plot_w
        );
        svg += &format!(
            "<text x=\"{}\" y=\"{}\" text-anchor=\"end\" fill=\"#1f77b4\">{:.0}</text>\n",
            left - 6.0,
            yy + 4.0,
            f * l_max
        );
        svg += &format!(
            "<text x=\"{}\" y=\"{}\" fill=\"#d62728\">{:.0}</text>\n",
            left + plot_w + 6.0,
            yy + 4.0,
            f * r_max
        );
        let tt = f * t_max;
        svg += &format!(
            "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{:.0}s</text>\n",
            x(tt),
            top + plot_h + 18.0,
            tt
        );
    }
    svg += &format!(
        "<rect x=\"{left}\" y=\"{top}\" width=\"{plot_w}\" height=\"{plot_h}\" fill=\"none\" stroke=\"#333\"/>\n"
    );
    for (t, l) in points {
        svg += &format!(
            "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"2\" fill=\"#1f77b4\" fill-opacity=\"0.6\"/>\n",
            x(*t),
            y_l(*l)
        );
    }
    let line: Vec<String> = per_sec
        .iter()
        .enumerate()
        .map(|(s, n)| format!("{:.1},{:.1}", x(s as f64 + 0.5), y_r(*n as f64)))
        .collect();
    svg += &format!(
        "<polyline points=\"{}\" fill=\"none\" stroke=\"#d62728\" stroke-width=\"1.5\"/>\n",
        line.join(" ")
    );
    svg += &format!(
        "<text x=\"16\" y=\"{}\" transform=\"rotate(-90 16 {})\" text-anchor=\"middle\" fill=\"#1f77b4\">latency (ms), one dot per message</text>\n",
        top + plot_h / 2.0,
        top + plot_h / 2.0
    );
    svg += &format!(
        "<text x=\"{}\" y=\"{}\" transform=\"rotate(90 {} {})\" text-anchor=\"middle\" fill=\"#d62728\">messages finished per second</text>\n",
        w - 14.0,
        top + plot_h / 2.0,
        w - 14.0,
        top + plot_h / 2.0
    );
    svg += &format!(
        "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">time since the first send</text>\n",
        left + plot_w / 2.0,
        h - 10.0
    );
    svg += "</svg>\n";
    svg
}

/// A round upper bound for an axis.
fn nice(v: f64) -> f64 {
    let magnitude = 10f64.powf(v.log10().floor());
    for step in [1.0, 2.0, 5.0, 10.0] {
        if v <= step * magnitude {
            return step * magnitude;
        }
    }
    10.0 * magnitude
}

#[cfg(test)]
mod tests {
    #[test]
    fn renders_a_complete_svg() {
        let svg = super::render(&[(0.5, 120.0), (1.2, 900.0), (2.7, 450.0)]);
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert_eq!(svg.matches("<circle").count(), 3);
        assert!(svg.contains("3 messages"));
    }
}
