//! The table every part of the report prints, and the formats of its cells.

use std::io::Write;

pub(super) struct Table {
    pub(super) title: String,
    pub(super) header: Vec<&'static str>,
    pub(super) rows: Vec<Vec<String>>,
}

impl Table {
    pub(super) fn render(&self, out: &mut impl Write) -> std::io::Result<()> {
        if self.rows.is_empty() {
            return Ok(());
        }
        let mut widths: Vec<usize> = self.header.iter().map(|h| h.len()).collect();
        for row in &self.rows {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(cell.len());
            }
        }
        writeln!(out, "\n{}", self.title)?;
        let line = |cells: Vec<&str>| {
            cells.iter().zip(&widths).map(|(c, w)| format!("{c:>w$}")).collect::<Vec<_>>().join("  ")
        };
        writeln!(out, "{}", line(self.header.clone()))?;
        for row in &self.rows {
            writeln!(out, "{}", line(row.iter().map(String::as_str).collect()))?;
        }
        Ok(())
    }
}

pub(super) fn ms(us: f64) -> String {
    format!("{:.3}", us / 1000.0)
}

pub(super) fn cores(v: f64) -> String {
    format!("{v:.2}")
}

pub(super) fn flush(ms: Option<u64>) -> String {
    ms.map_or_else(|| "-".into(), |m| format!("{m} ms"))
}
