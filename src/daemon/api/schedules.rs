//! A blocksnap extension: `GET /v1/{tenant}/os-blocksnap-schedules` (and
//! the same under /v2 and /v3), the
//! scheduled volumes the tenant can see, each with its schedule, keep
//! rules, last run (time, result, cause, snapshot) and next run.

use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Value};

use super::body::ApiResult;
use super::{run, Shared, Tenant};
use crate::daemon::schedule::ScheduleStatus;
use crate::util::format_timestamp;

pub(super) fn routes() -> Router<Shared> {
    // The same view under every API version's prefix.
    ["v1", "v2", "v3"].iter().fold(Router::new(), |r, v| {
        r.route(
            &format!("/{v}/{{tenant}}/os-blocksnap-schedules"),
            get(schedules_list),
        )
    })
}

/// One scheduled volume as the API shows it (times as the API formats
/// them, UTC; `null` when there is none).
pub fn schedule_view(s: &ScheduleStatus) -> Value {
    let t = |u: Option<i64>| u.map(format_timestamp);
    let st = &s.state;
    json!({
        "volume_id": s.volume_id,
        "schedule": s.schedule,
        "keep": {
            "hourly": s.keep.hourly,
            "daily": s.keep.daily,
            "weekly": s.keep.weekly,
            "monthly": s.keep.monthly,
        },
        "prune_api_snapshots": s.prune_api_snapshots,
        "running": s.running,
        "last_run_at": t(st.last_attempt_us),
        "last_result": st.last_outcome.map(|o| o.as_str()),
        "last_error": st.last_error,
        "last_snapshot_id": st.last_snapshot,
        "last_success_at": t(st.last_success_us),
        "last_failure_at": t(st.last_failure_us),
        "next_run_at": t(s.next_run_us),
        "runs": {
            "ok": st.runs_ok,
            "error": st.runs_failed,
            "busy": st.runs_busy,
        },
        "pruned": st.pruned,
        "prune_error": st.prune_error,
    })
}

async fn schedules_list(
    State(d): State<Shared>,
    axum::Extension(tenant): axum::Extension<Tenant>,
) -> ApiResult<Json<Value>> {
    let c = tenant.caller();
    let visible = run(&d, move |ops| ops.visible_volume_ids(&c)).await?;
    let rows: Vec<Value> = d
        .scheduler()
        .map(|s| s.status())
        .unwrap_or_default()
        .iter()
        .filter(|s| visible.contains(&s.volume_id))
        .map(schedule_view)
        .collect();
    Ok(Json(json!({ "schedules": rows })))
}
