//! `blocksnap schedule list`: the scheduled volumes, their last and next
//! runs, from blocksnapd.

use clap::Subcommand;
use hyper::Method;
use serde_json::Value;

use crate::client_cmd::{client, print_json, runtime, ClientArgs};
use crate::Failure;
use blocksnap::util::printable;

#[derive(Subcommand, Debug)]
pub enum ScheduleCommand {
    /// List the scheduled volumes: schedule, keep rules, last run and its result, next run
    List,
}

fn text(v: &Value) -> String {
    printable(&match v {
        Value::String(x) => x.clone(),
        Value::Null => "-".to_string(),
        other => other.to_string(),
    })
    .into_owned()
}

/// An API time ("2026-01-01T01:00:00.000000", UTC) to the second.
fn time(v: &Value) -> String {
    match v.as_str() {
        Some(t) => format!("{}Z", printable(t.get(..19).unwrap_or(t))),
        None => "-".to_string(),
    }
}

fn keep(v: &Value) -> String {
    let parts: Vec<String> = ["hourly", "daily", "weekly", "monthly"]
        .iter()
        .filter_map(|k| {
            let n = v[k].as_u64().unwrap_or(0);
            (n > 0).then(|| format!("{k}={n}"))
        })
        .collect();
    if parts.is_empty() {
        "all".to_string()
    } else {
        parts.join(",")
    }
}

fn table(list: &[Value]) {
    println!(
        "{:<36}  {:<22}  {:<30}  {:<20}  {:<7}  {:<20}  {:<36}",
        "VOLUME", "SCHEDULE", "KEEP", "LAST RUN", "RESULT", "NEXT RUN", "LAST SNAPSHOT"
    );
    for x in list {
        let result = if x["running"].as_bool() == Some(true) {
            "running".to_string()
        } else {
            text(&x["last_result"])
        };
        println!(
            "{:<36}  {:<22}  {:<30}  {:<20}  {:<7}  {:<20}  {:<36}",
            text(&x["volume_id"]),
            text(&x["schedule"]),
            keep(&x["keep"]),
            time(&x["last_run_at"]),
            result,
            time(&x["next_run_at"]),
            text(&x["last_snapshot_id"]),
        );
    }
    for x in list {
        if let Some(e) = x["last_error"].as_str() {
            println!(
                "{}: last run {}: {}",
                text(&x["volume_id"]),
                text(&x["last_result"]),
                printable(e)
            );
        }
        if let Some(e) = x["prune_error"].as_str() {
            println!(
                "{}: pruning stopped: {}",
                text(&x["volume_id"]),
                printable(e)
            );
        }
    }
}

pub fn schedule(cmd: ScheduleCommand, a: ClientArgs) -> Result<(), Failure> {
    let c = client(&a)?;
    runtime().block_on(async {
        match cmd {
            ScheduleCommand::List => {
                let (_, v) = c.call(Method::GET, "/os-blocksnap-schedules", None).await?;
                if a.json {
                    print_json(&v["schedules"]);
                } else {
                    table(
                        v["schedules"]
                            .as_array()
                            .map(|x| x.as_slice())
                            .unwrap_or(&[]),
                    );
                }
                Ok(())
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_escaped() {
        assert_eq!(printable("a\u{1b}[31mb\n"), "a\\u{1b}[31mb\\n");
        assert_eq!(
            time(&Value::from("2026-01-01T01:00:00.000000")),
            "2026-01-01T01:00:00Z"
        );
        assert_eq!(time(&Value::Null), "-");
        assert_eq!(
            keep(&serde_json::json!({"hourly": 24, "daily": 0, "monthly": 12})),
            "hourly=24,monthly=12"
        );
        assert_eq!(keep(&serde_json::json!({})), "all");
    }
}
