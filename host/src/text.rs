//! Text from a backend (error messages, a plugin's name, its stderr), made
//! safe to show on the user's terminal.
//!
//! A plugin is untrusted, and its text ends up in the user's build output:
//! escape sequences could retitle or clear the terminal, a newline could
//! start a line that looks like gocp's own, and one message could be
//! megabytes long. So every such string passes through here where it enters
//! the host: control characters become spaces (or `?` for escapes), and the
//! length is bounded. It never decides where the text goes.

/// Longest message kept from a plugin, in characters: enough for any useful
/// error, short enough for one line of build output.
pub const MAX_MESSAGE: usize = 300;

/// One line of at most [`MAX_MESSAGE`] characters, with nothing a terminal
/// would interpret.
pub fn one_line(s: &str) -> String {
    bounded(s, MAX_MESSAGE)
}

/// A line of a plugin's stderr: as [`one_line`], with a longer bound, since
/// the user asked for it with `--verbose`.
pub fn stderr_line(s: &str) -> String {
    bounded(s, 4 * 1024)
}

fn bounded(s: &str, max: usize) -> String {
    let mut out = String::with_capacity(s.len().min(max + 16));
    for (kept, c) in s.chars().enumerate() {
        if kept == max {
            let rest = s.chars().count() - kept;
            out.push_str(&format!("... ({rest} more characters)"));
            return out;
        }
        out.push(match c {
            '\u{1b}' => '?',
            c if c.is_control() || is_invisible_format(c) => ' ',
            c => c,
        });
    }
    out
}

/// Characters that change how the rest of a line displays without showing
/// themselves: bidirectional overrides and isolates.
fn is_invisible_format(c: char) -> bool {
    matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}' | '\u{200e}' | '\u{200f}')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn terminal_controls_and_new_lines_are_neutralised() {
        let forged = "down\u{1b}]0;owned\u{7}\u{1b}[2J\ngocp: all good\r\u{202e}txt";
        let shown = one_line(forged);
        assert!(!shown.chars().any(|c| c.is_control()), "{shown:?}");
        assert_eq!(shown, "down?]0;owned ?[2J gocp: all good  txt");
    }

    #[test]
    fn long_messages_are_cut() {
        let shown = one_line(&"x".repeat(1_000_000));
        assert!(shown.starts_with(&"x".repeat(MAX_MESSAGE)));
        assert!(shown.ends_with("... (999700 more characters)"), "{}", &shown[MAX_MESSAGE..]);
    }
}
