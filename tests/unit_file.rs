//! packaging/socklens-agent.service scores "OK" or better in systemd's own
//! exposure analysis (`systemd-analyze security --offline=yes`, which reads
//! the unit file without a running systemd; scripts/install-deps.sh installs it).

use std::process::Command;

#[test]
fn agent_unit_exposure_is_ok_or_better() {
    let unit = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/packaging/socklens-agent.service"
    );
    let out = Command::new("systemd-analyze")
        .args(["security", "--offline=yes", "--no-pager", unit])
        .output()
        .expect("systemd-analyze (apt-get install systemd)");
    let text = String::from_utf8_lossy(&out.stdout);
    let overall = text
        .lines()
        .find(|l| l.contains("Overall exposure level"))
        .unwrap_or_else(|| {
            panic!(
                "no overall score: {text}{}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
    let score: f64 = overall
        .split(':')
        .nth(1)
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("unparsable: {overall}"));
    assert!(
        ["OK", "SAFE", "PERFECT"]
            .iter()
            .any(|r| overall.contains(r))
            && score < 5.0,
        "{overall}\n{text}"
    );
}
