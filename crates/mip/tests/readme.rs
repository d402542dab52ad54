//! README.md against the binary it documents: every flag that `mip <command> --help` lists is in
//! the README with its environment variable and default, so a flag added to the code without
//! a line in the README fails here instead of surprising a user.

mod common;

use std::collections::BTreeMap;

use common::run_mip;

/// One flag as `--help` shows it.
#[derive(Debug)]
struct Flag {
    /// Without the leading `--`.
    name: String,
    /// The environment variable that sets it, if any.
    env: Option<String>,
    /// Its default, as `--help` prints it.
    default: Option<String>,
}

/// The flags `mip <command> --help` lists, but `--help` and `--version`.
fn flags(command: &str) -> Vec<Flag> {
    let (status, help) = run_mip(&[command, "--help"], &BTreeMap::new());
    assert!(status.success(), "mip {command} --help: {status}");
    let mut flags: Vec<Flag> = Vec::new();
    for line in help.lines() {
        let line = line.trim_start();
        // `--name <VALUE>`, `-h, --help`
        let long = line
            .strip_prefix("--")
            .or_else(|| line.split_once(", --").map(|(_, rest)| rest));
        if let Some(rest) = long.filter(|_| line.starts_with('-')) {
            let name = rest.split_whitespace().next().unwrap_or_default();
            flags.push(Flag {
                name: name.to_owned(),
                env: None,
                default: None,
            });
            continue;
        }
        let Some(flag) = flags.last_mut() else {
            continue;
        };
        if let Some(env) = line.strip_prefix("[env: ") {
            let end = env.find(['=', ']']).unwrap_or(env.len());
            flag.env = Some(env[..end].to_owned());
        } else if let Some(default) = line.strip_prefix("[default: ") {
            flag.default = Some(default.trim_end_matches(']').to_owned());
        }
    }
    flags.retain(|f| f.name != "help" && f.name != "version");
    assert!(
        !flags.is_empty(),
        "no flags found in mip {command} --help:\n{help}"
    );
    flags
}

fn readme() -> String {
    std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../README.md"))
        .expect("README.md")
}

/// The text of the README section with this `## ` heading.
fn section(readme: &str, heading: &str) -> String {
    let start = readme
        .find(&format!("\n## {heading}\n"))
        .unwrap_or_else(|| panic!("README has a \"{heading}\" section"));
    let body = &readme[start + 1..];
    let end = body[3..].find("\n## ").map_or(body.len(), |end| end + 3);
    body[..end].to_owned()
}

/// The rows of the flag table: (flags and environment variables, defaults).
fn table_rows(section: &str) -> Vec<(String, String)> {
    section
        .lines()
        .filter(|line| line.starts_with("| `"))
        .map(|line| {
            let cells: Vec<&str> = line.split(" | ").collect();
            (
                cells[0].to_owned(),
                cells.get(1).copied().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

/// What the README lacks about `flag` of `mip <command>`, if anything: a table row naming the
/// flag and its variable, with its default.
fn missing_from_table(command: &str, flag: &Flag, rows: &[(String, String)]) -> Option<String> {
    let name = format!("`--{}`", flag.name);
    let Some((_, defaults)) = rows.iter().find(|(flags, _)| {
        flags.contains(&name)
            && flag
                .env
                .as_ref()
                .is_none_or(|env| flags.contains(&format!("`{env}`")))
    }) else {
        let env = flag.env.as_deref().unwrap_or("no variable");
        return Some(format!("mip {command}: no row for {name} ({env})"));
    };
    match &flag.default {
        Some(default) if !defaults.contains(&format!("`{default}`")) => Some(format!(
            "mip {command}: the row of {name} does not give its default `{default}`"
        )),
        _ => None,
    }
}

#[test]
fn every_flag_of_the_service_commands_is_in_the_readme_table_with_its_variable_and_default() {
    let readme = readme();
    let rows = table_rows(&section(&readme, "Run the services separately"));
    assert!(rows.len() > 10, "the flag table has its rows: {rows:?}");
    let mut missing = Vec::new();
    for command in ["all", "crm", "inventory", "integration"] {
        for flag in flags(command) {
            assert!(
                flag.env.is_some(),
                "mip {command} --{} has an environment variable",
                flag.name
            );
            missing.extend(missing_from_table(command, &flag, &rows));
        }
    }
    assert!(
        missing.is_empty(),
        "README.md, \"Run the services separately\", lacks:\n{}",
        missing.join("\n")
    );
}

#[test]
fn every_flag_of_mip_health_is_in_the_readme_with_its_variable_and_default() {
    let readme = readme();
    let health = section(&readme, "Health checks");
    let rows = table_rows(&section(&readme, "Run the services separately"));
    let mut missing = Vec::new();
    for flag in flags("health") {
        // The global flags (--log-format, --metrics-addr) are in the table.
        if missing_from_table("health", &flag, &rows).is_none() {
            continue;
        }
        let mut wanted = vec![format!("`--{}`", flag.name)];
        wanted.extend(flag.env.iter().map(|env| format!("`{env}`")));
        wanted.extend(flag.default.iter().map(|default| format!("`{default}`")));
        missing.extend(
            wanted
                .into_iter()
                .filter(|text| !health.contains(text))
                .map(|text| format!("--{}: {text}", flag.name)),
        );
    }
    assert!(
        missing.is_empty(),
        "README.md, \"Health checks\", lacks:\n{}",
        missing.join("\n")
    );
}
