//! Stop sequences over streamed text: text is released as soon as it cannot be the
//! start of a stop sequence, and cut where one begins.

pub struct StopScan {
    stops: Vec<String>,
    /// Text held back: it may be the start of a stop sequence.
    held: String,
}

impl StopScan {
    pub fn new(stops: Vec<String>) -> Self {
        Self {
            stops,
            held: String::new(),
        }
    }

    /// Adds the next piece of text: returns what may be shown now, and whether a stop
    /// sequence ended the output (then nothing after it is shown).
    pub fn push(&mut self, delta: &str) -> (String, bool) {
        self.held.push_str(delta);
        let first = self
            .stops
            .iter()
            .filter_map(|s| self.held.find(s.as_str()))
            .min();
        if let Some(at) = first {
            let out = self.held[..at].to_string();
            self.held.clear();
            return (out, true);
        }
        // The longest tail of the held text that begins some stop sequence stays held.
        let keep = self
            .stops
            .iter()
            .flat_map(|s| {
                (1..s.len())
                    .filter(|&k| s.is_char_boundary(k) && self.held.ends_with(&s[..k]))
                    .max()
            })
            .max()
            .unwrap_or(0);
        let out = self.held[..self.held.len() - keep].to_string();
        self.held.drain(..self.held.len() - keep);
        (out, false)
    }

    /// The text still held once the generation ended without a stop sequence.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], pieces: &[&str]) -> (String, bool) {
        let mut scan = StopScan::new(stops.iter().map(|s| s.to_string()).collect());
        let mut out = String::new();
        for p in pieces {
            let (text, stopped) = scan.push(p);
            out.push_str(&text);
            if stopped {
                return (out, true);
            }
        }
        out.push_str(&scan.finish());
        (out, false)
    }

    #[test]
    fn cuts_at_a_stop_spanning_pieces_and_releases_false_starts() {
        assert_eq!(
            run(&["END"], &["ab", "cE", "N", "Dxyz"]),
            ("abc".into(), true)
        );
        assert_eq!(
            run(&["END"], &["ab", "cE", "N", "x"]),
            ("abcENx".into(), false)
        );
        assert_eq!(
            run(&["\n", "zz"], &["hello", " world\nmore"]),
            ("hello world".into(), true)
        );
        assert_eq!(run(&[], &["a", "b"]), ("ab".into(), false));
        // The earliest of several stops wins.
        assert_eq!(run(&["c", "ab"], &["xabc"]), ("x".into(), true));
    }

    #[test]
    fn holds_back_only_a_possible_start() {
        let mut scan = StopScan::new(vec!["END".into()]);
        assert_eq!(scan.push("aE"), ("a".into(), false));
        assert_eq!(scan.push("x"), ("Ex".into(), false));
        assert_eq!(scan.push("é"), ("é".into(), false));
    }
}
