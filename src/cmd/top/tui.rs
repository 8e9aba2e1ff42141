//! `socklens top`'s terminal: raw mode, the alternate screen and keys.

use std::io::{self, Write};
use std::sync::Once;
use std::time::Duration;

use crossterm::event::{self, Event as TermEvent, KeyCode, KeyEvent, KeyEventKind, KeyModifiers};
use crossterm::terminal::{EnterAlternateScreen, LeaveAlternateScreen};
use ratatui::backend::CrosstermBackend;
use ratatui::layout::{Alignment, Constraint, Layout};
use ratatui::style::{Modifier, Style};
use ratatui::text::Line;
use ratatui::widgets::{Cell, Paragraph, Row as TableRow, Table};
use ratatui::Terminal;

use crate::accounting::{Report, View};
use crate::error::{Context, Result};
use crate::output::top::Sheet;
use crate::output::Renderer;

fn restore_terminal() {
    // Best effort: this also runs from the panic hook, where nothing can be
    // reported.
    let _ = crossterm::terminal::disable_raw_mode();
    let _ = crossterm::execute!(io::stdout(), LeaveAlternateScreen, crossterm::cursor::Show);
}

/// Restores the terminal before a panic message is printed, so the message
/// is not lost on the alternate screen and the shell is usable after.
fn install_panic_restore() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            restore_terminal();
            previous(info);
        }));
    });
}

/// Raw mode and the alternate screen, undone on drop (errors and panics too).
struct TerminalGuard;

impl Drop for TerminalGuard {
    fn drop(&mut self) {
        restore_terminal();
    }
}

pub(super) struct Screen<'w> {
    terminal: Terminal<CrosstermBackend<&'w mut dyn Write>>,
    _guard: TerminalGuard,
}

impl<'w> Screen<'w> {
    pub(super) fn enter(out: &'w mut dyn Write) -> Result<Self> {
        install_panic_restore();
        crossterm::terminal::enable_raw_mode().ctx("drawing the terminal")?;
        let guard = TerminalGuard;
        let mut terminal = Terminal::new(CrosstermBackend::new(out)).ctx("drawing the terminal")?;
        crossterm::execute!(
            terminal.backend_mut(),
            EnterAlternateScreen,
            crossterm::cursor::Hide
        )
        .ctx("drawing the terminal")?;
        terminal.clear().ctx("drawing the terminal")?;
        Ok(Self {
            terminal,
            _guard: guard,
        })
    }

    /// Rows that fit under the two header lines, the column titles and the footer.
    fn visible_rows(&self) -> usize {
        self.terminal
            .size()
            .map_or(0, |s| usize::from(s.height).saturating_sub(4))
    }

    pub(super) fn show(
        &mut self,
        report: &Report,
        view: View,
        renderer: &mut Renderer,
    ) -> Result<()> {
        let sheet = Sheet::new(report, view, renderer, self.visible_rows());
        self.draw(&sheet)
    }

    pub(super) fn draw(&mut self, sheet: &Sheet) -> Result<()> {
        let header = TableRow::new(sheet.columns.iter().map(|c| Cell::from(c.title)))
            .style(Style::default().add_modifier(Modifier::REVERSED));
        let rows = sheet.rows.iter().map(|cells| {
            TableRow::new(sheet.columns.iter().zip(cells).map(|(c, s)| {
                let align = if c.right {
                    Alignment::Right
                } else {
                    Alignment::Left
                };
                Cell::from(Line::from(s.as_str()).alignment(align))
            }))
        });
        let widths = sheet.columns.iter().map(|c| Constraint::Length(c.width));
        let table = Table::new(rows, widths).header(header).column_spacing(1);
        let head = Paragraph::new(vec![
            Line::from(sheet.title.as_str()),
            Line::from(sheet.summary.as_str()),
        ]);
        let foot =
            Paragraph::new("q quit   s sort (rx/tx/retrans)   b group by (conn/process/cgroup)")
                .style(Style::default().add_modifier(Modifier::DIM));
        self.terminal
            .draw(|f| {
                let [top, body, bottom] = Layout::vertical([
                    Constraint::Length(2),
                    Constraint::Min(1),
                    Constraint::Length(1),
                ])
                .areas(f.area());
                f.render_widget(head, top);
                f.render_widget(table, body);
                f.render_widget(foot, bottom);
            })
            .ctx("drawing the terminal")?;
        Ok(())
    }
}

/// What a key press asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Input {
    Quit,
    NextSort,
    NextGroup,
    Redraw,
}

pub(super) fn input_of(key: KeyEvent) -> Option<Input> {
    if key.kind != KeyEventKind::Press {
        return None;
    }
    match key.code {
        // Raw mode turns Ctrl-C into a key, not a SIGINT.
        KeyCode::Char('c') if key.modifiers.contains(KeyModifiers::CONTROL) => Some(Input::Quit),
        KeyCode::Char('q' | 'Q') | KeyCode::Esc => Some(Input::Quit),
        KeyCode::Char('s') => Some(Input::NextSort),
        KeyCode::Char('b') => Some(Input::NextGroup),
        _ => None,
    }
}

/// Key presses and resizes waiting in the terminal, without blocking.
pub(super) fn pending_input() -> Result<Vec<Input>> {
    let mut inputs = Vec::new();
    while event::poll(Duration::ZERO).ctx("drawing the terminal")? {
        match event::read().ctx("drawing the terminal")? {
            TermEvent::Key(k) => inputs.extend(input_of(k)),
            TermEvent::Resize(..) => inputs.push(Input::Redraw),
            _ => {}
        }
    }
    Ok(inputs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::accounting::{GroupBy, SortKey};

    #[test]
    fn keys_quit_and_cycle() {
        let key = |code, modifiers| input_of(KeyEvent::new(code, modifiers));
        assert_eq!(
            key(KeyCode::Char('q'), KeyModifiers::NONE),
            Some(Input::Quit)
        );
        assert_eq!(
            key(KeyCode::Char('c'), KeyModifiers::CONTROL),
            Some(Input::Quit)
        );
        assert_eq!(key(KeyCode::Char('c'), KeyModifiers::NONE), None);
        assert_eq!(
            key(KeyCode::Char('s'), KeyModifiers::NONE),
            Some(Input::NextSort)
        );
        assert_eq!(SortKey::Retrans.next(), SortKey::Rx);
        assert_eq!(GroupBy::Cgroup.next(), GroupBy::Conn);
    }
}
