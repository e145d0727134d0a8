//! The item codec: every attribute name, every key, and the translation
//! between items and the domain's types and rules, in one place.

use std::collections::HashMap;

use aws_sdk_dynamodb::types::AttributeValue;
use chrono::{DateTime, Utc};

use crate::Error;
use crate::model::{
    AttemptKind, AttemptRecord, Blob, KernelStats, Launched, Run, RunState, SpotPrice, Task,
    TaskStatus, Usage,
};
use crate::rules::{TaskChange, TaskFacts};

pub(super) type Item = HashMap<String, AttributeValue>;

pub(super) const PK: &str = "pk";
pub(super) const SK: &str = "sk";

// Task attributes.
pub(super) const TASK_ID: &str = "task_id";
pub(super) const ACCOUNT: &str = "account";
pub(super) const KERNEL: &str = "kernel";
pub(super) const STATUS: &str = "status";
pub(super) const CREATED_AT: &str = "created_at";
/// Only PENDING tasks carry it: the key of the sparse `pending` index.
pub(super) const PENDING_SHARD: &str = "pending_shard";
pub(super) const PAYLOAD: &str = "payload";
pub(super) const PAYLOAD_KEY: &str = "payload_key";
pub(super) const RUN_ID: &str = "run_id";
pub(super) const QUEUED_AT: &str = "queued_at";
pub(super) const ATTEMPTS: &str = "attempts";
pub(super) const FAILED_ATTEMPTS: &str = "failed_attempts";
pub(super) const INTERRUPTIONS: &str = "interruptions";
pub(super) const SEEN_EVENTS: &str = "seen_events";
pub(super) const INSTANCE_ID: &str = "instance_id";
pub(super) const STARTED_AT: &str = "started_at";
pub(super) const DEADLINE: &str = "deadline";
pub(super) const FINISHED_AT: &str = "finished_at";
pub(super) const DURATION_MS: &str = "duration_ms";
pub(super) const RESULT: &str = "result";
pub(super) const RESULT_KEY: &str = "result_key";
pub(super) const SUMMARY: &str = "summary";
pub(super) const LAST_ERROR: &str = "last_error";
/// A list of `{instance_id, started_at, ended_at, outcome}`: the attempts
/// that did not finish the task.
pub(super) const ATTEMPT_LOG: &str = "attempt_log";
pub(super) const IDEMPOTENCY_KEY: &str = "idempotency_key";
pub(super) const REQUEST_DIGEST: &str = "request_digest";
/// The request that wrote the task (and, while it is STAGED, is writing it).
pub(super) const REQUEST_ID: &str = "request_id";
/// The table's TTL attribute: a STAGED task whose request died goes away.
pub(super) const EXPIRES_AT: &str = "expires_at";

// Run attributes.
pub(super) const ID: &str = "id";
pub(super) const STATE: &str = "state";
pub(super) const QUEUED: &str = "queued";
pub(super) const DONE: &str = "done";
pub(super) const FAILED: &str = "failed";
/// Tasks the run's cancel ended, and results kept after it.
pub(super) const CANCELLED: &str = "cancelled";
pub(super) const LATE: &str = "late";
/// A map: instance id → `{launched_at, instance_type, lifecycle, zone,
/// ended_at, slots}`.
pub(super) const INSTANCES: &str = "instances";
pub(super) const ZONE: &str = "zone";
pub(super) const ENDED_AT: &str = "ended_at";
pub(super) const SLOTS: &str = "slots";
/// A map: `"<type> <zone>"` → `{instance_type, zone, usd_per_hour, read_at}`.
pub(super) const SPOT_PRICES: &str = "spot_prices";
/// A map: instance id → how many of the run's tasks it ended.
pub(super) const INSTANCE_TASKS: &str = "instance_tasks";
/// A map: instance id → the milliseconds its kernels took on those tasks.
pub(super) const INSTANCE_BUSY_MS: &str = "instance_busy_ms";
/// A map: the run's [`Usage`](crate::model::Usage), field by field.
pub(super) const USAGE: &str = "usage";
/// The run's counters of AWS calls, one per component and operation.
pub(super) const CALLS_PREFIX: &str = "calls:";
/// Per kernel: tasks queued, tasks ended, their kernel time; counters named
/// `<prefix>:<kernel>` (see [`kernel_counter`]).
pub(super) const KERNEL_QUEUED: &str = "kernel_queued";
pub(super) const KERNEL_ENDED: &str = "kernel_ended";
pub(super) const KERNEL_BUSY_MS: &str = "kernel_busy_ms";

/// The run item's counter of `kernel` for `prefix`.
pub(super) fn kernel_counter(prefix: &str, kernel: &str) -> String {
    format!("{prefix}:{kernel}")
}
/// The dispatcher's last fleet plan (JSON text).
pub(super) const PLAN: &str = "plan";
/// Why an instance was launched.
pub(super) const REASON: &str = "reason";
/// Every run item has it, with the one value [`RUN_LIST_VALUE`]: the
/// partition of the `runs` index, which lists runs by `started_at`.
pub(super) const RUN_LIST: &str = "run_list";
pub(super) const RUN_LIST_VALUE: &str = "RUN";
pub(super) const FLEET_REQUESTS: &str = "fleet_requests";
pub(super) const LEASE_OWNER: &str = "lease_owner";
pub(super) const LEASE_UNTIL: &str = "lease_until";
pub(super) const WAITING: &str = "waiting";

// The current-run pointer.
pub(super) const CURRENT_RUN: &str = "CURRENT_RUN";
pub(super) const CURRENT_RUN_ID: &str = "current_run_id";

pub(super) fn key(pk: &str, sk: &str) -> Item {
    HashMap::from([(PK.to_owned(), s(pk)), (SK.to_owned(), s(sk))])
}

pub(super) fn task_key(task_id: &str) -> Item {
    key(&format!("TASK#{task_id}"), "TASK")
}

pub(super) fn run_key(run_id: &str) -> Item {
    key(&format!("RUN#{run_id}"), "RUN")
}

pub(super) fn current_run_key() -> Item {
    key(CURRENT_RUN, CURRENT_RUN)
}

/// The task id of a task item's partition key.
pub(super) fn task_id_of_key(item: &Item) -> Option<String> {
    opt_s(item, PK).and_then(|pk| pk.strip_prefix("TASK#").map(str::to_owned))
}

pub(super) fn s(value: &str) -> AttributeValue {
    AttributeValue::S(value.to_owned())
}

pub(super) fn num(value: u64) -> AttributeValue {
    AttributeValue::N(value.to_string())
}

pub(crate) use crate::model::timestamp;

pub(super) fn opt_s(item: &Item, name: &str) -> Option<String> {
    item.get(name).and_then(|v| v.as_s().ok()).cloned()
}

pub(super) fn req_s(item: &Item, name: &'static str) -> Result<String, Error> {
    opt_s(item, name).ok_or_else(|| Error::malformed("item", format!("missing {name}")))
}

pub(super) fn opt_n(item: &Item, name: &str) -> Result<Option<u64>, Error> {
    item.get(name)
        .and_then(|v| v.as_n().ok())
        .map(|n| {
            n.parse()
                .map_err(|_| Error::malformed("item", format!("{name} is not a count")))
        })
        .transpose()
}

fn parse_time(text: &str) -> Result<DateTime<Utc>, Error> {
    DateTime::parse_from_rfc3339(text)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| Error::malformed("timestamp", e))
}

pub(super) fn opt_time(item: &Item, name: &str) -> Result<Option<DateTime<Utc>>, Error> {
    opt_s(item, name).map(|text| parse_time(&text)).transpose()
}

/// The size DynamoDB counts for an item: names and values.
pub(super) fn item_size(item: &Item) -> usize {
    item.iter()
        .map(|(name, value)| name.len() + value_size(value))
        .sum()
}

fn value_size(value: &AttributeValue) -> usize {
    match value {
        AttributeValue::S(text) | AttributeValue::N(text) => text.len(),
        AttributeValue::Ss(items) | AttributeValue::Ns(items) => {
            items.iter().map(String::len).sum()
        }
        AttributeValue::M(map) => 3 + item_size(map),
        AttributeValue::L(list) => 3 + list.iter().map(value_size).sum::<usize>(),
        AttributeValue::B(bytes) => bytes.as_ref().len(),
        _ => 1,
    }
}

/// A blob is stored as `<name>` (JSON text) or `<name>_key` (an S3 key).
pub(super) fn blob_attribute(
    inline: &'static str,
    stored: &'static str,
    blob: &Blob,
) -> (&'static str, AttributeValue) {
    match blob {
        Blob::Inline(raw) => (inline, s(raw.get())),
        Blob::Stored { key } => (stored, s(key)),
    }
}

pub(super) fn blob_from_item(
    item: &Item,
    inline: &str,
    stored: &str,
) -> Result<Option<Blob>, Error> {
    if let Some(text) = opt_s(item, inline) {
        return Blob::from_text(text)
            .map(Some)
            .map_err(|e| Error::malformed("stored JSON", e));
    }
    Ok(opt_s(item, stored).map(|key| Blob::Stored { key }))
}

fn count(item: &Item, name: &str) -> Result<u32, Error> {
    Ok(u32::try_from(opt_n(item, name)?.unwrap_or(0)).unwrap_or(u32::MAX))
}

pub(super) fn status_of(item: &Item) -> Result<TaskStatus, Error> {
    let status = req_s(item, STATUS)?;
    TaskStatus::parse(&status).ok_or_else(|| Error::malformed("task status", status))
}

/// What the rules read of a task item.
pub(super) fn facts<'a>(item: &'a Item, event_id: Option<&str>) -> Result<TaskFacts<'a>, Error> {
    Ok(TaskFacts {
        status: status_of(item)?,
        run_id: item
            .get(RUN_ID)
            .and_then(|v| v.as_s().ok())
            .map(String::as_str),
        event_seen: event_id.is_some_and(|id| {
            item.get(SEEN_EVENTS)
                .and_then(|v| v.as_ss().ok())
                .is_some_and(|seen| seen.iter().any(|s| s == id))
        }),
    })
}

/// The condition that states [`TaskChange::allowed`] for DynamoDB: its
/// expression, the attribute names it uses and its values.
pub(super) fn condition(
    change: &TaskChange<'_>,
    event_id: Option<&str>,
) -> (&'static str, Vec<&'static str>, Item) {
    let queued = (":c_queued".to_owned(), s(TaskStatus::Queued.as_str()));
    let pending = (":c_pending".to_owned(), s(TaskStatus::Pending.as_str()));
    match *change {
        TaskChange::Queue => (
            "#status = :c_pending",
            vec![STATUS],
            HashMap::from([pending]),
        ),
        TaskChange::Finish { run_id } => (
            "#status = :c_queued AND #run_id = :c_run",
            vec![STATUS, RUN_ID],
            HashMap::from([queued, (":c_run".to_owned(), s(run_id))]),
        ),
        TaskChange::CountAttempt { run_id } => (
            "#status = :c_queued AND #run_id = :c_run AND NOT contains(#seen_events, :c_event)",
            vec![STATUS, RUN_ID, SEEN_EVENTS],
            HashMap::from([
                queued,
                (":c_run".to_owned(), s(run_id)),
                (":c_event".to_owned(), s(event_id.unwrap_or_default())),
            ]),
        ),
        TaskChange::Cancel { run_id } => (
            "#status = :c_pending OR (#status = :c_queued AND #run_id = :c_run)",
            vec![STATUS, RUN_ID],
            HashMap::from([pending, queued, (":c_run".to_owned(), s(run_id))]),
        ),
        TaskChange::RecordLate { run_id } => (
            "#status = :c_cancelled AND #run_id = :c_run AND NOT contains(#seen_events, :c_event)",
            vec![STATUS, RUN_ID, SEEN_EVENTS],
            HashMap::from([
                (":c_cancelled".to_owned(), s(TaskStatus::Cancelled.as_str())),
                (":c_run".to_owned(), s(run_id)),
                (":c_event".to_owned(), s(crate::rules::LATE_RESULT)),
            ]),
        ),
    }
}

pub(super) fn task_from_item(item: &Item) -> Result<Task, Error> {
    Ok(Task {
        id: req_s(item, TASK_ID)?,
        account: req_s(item, ACCOUNT)?,
        kernel: req_s(item, KERNEL)?,
        status: status_of(item)?,
        created_at: opt_time(item, CREATED_AT)?
            .ok_or_else(|| Error::malformed("task", "no created_at"))?,
        run_id: opt_s(item, RUN_ID),
        payload: blob_from_item(item, PAYLOAD, PAYLOAD_KEY)?,
        attempts: count(item, ATTEMPTS)?,
        failed_attempts: count(item, FAILED_ATTEMPTS)?,
        interruptions: count(item, INTERRUPTIONS)?,
        instance_id: opt_s(item, INSTANCE_ID),
        started_at: opt_time(item, STARTED_AT)?,
        finished_at: opt_time(item, FINISHED_AT)?,
        duration_ms: opt_n(item, DURATION_MS)?,
        result: blob_from_item(item, RESULT, RESULT_KEY)?,
        summary: opt_s(item, SUMMARY),
        last_error: opt_s(item, LAST_ERROR),
        attempt_log: attempt_log_from_item(item)?,
        request_digest: opt_s(item, REQUEST_DIGEST),
    })
}

pub(super) fn attempt_value(attempt: &AttemptRecord) -> AttributeValue {
    let mut fields = HashMap::from([
        ("instance_id".to_owned(), s(&attempt.instance_id)),
        (ENDED_AT.to_owned(), s(&timestamp(attempt.ended_at))),
        ("outcome".to_owned(), s(attempt.outcome.as_str())),
    ]);
    if let Some(started_at) = attempt.started_at {
        fields.insert(STARTED_AT.to_owned(), s(&timestamp(started_at)));
    }
    AttributeValue::M(fields)
}

fn attempt_log_from_item(item: &Item) -> Result<Vec<AttemptRecord>, Error> {
    let Some(list) = item.get(ATTEMPT_LOG).and_then(|v| v.as_l().ok()) else {
        return Ok(Vec::new());
    };
    list.iter()
        .map(|value| {
            let fields = value
                .as_m()
                .map_err(|_| Error::malformed("task", "an attempt is not a map"))?;
            let outcome = req_s(fields, "outcome")?;
            Ok(AttemptRecord {
                instance_id: req_s(fields, "instance_id")?,
                started_at: opt_time(fields, STARTED_AT)?,
                ended_at: opt_time(fields, ENDED_AT)?
                    .ok_or_else(|| Error::malformed("task", "an attempt has no end"))?,
                outcome: AttemptKind::parse(&outcome)
                    .ok_or_else(|| Error::malformed("attempt outcome", outcome))?,
            })
        })
        .collect()
}

pub(super) fn spot_price_key(price: &SpotPrice) -> String {
    format!("{} {}", price.instance_type, price.zone)
}

pub(super) fn spot_price_value(price: &SpotPrice) -> AttributeValue {
    AttributeValue::M(HashMap::from([
        ("instance_type".to_owned(), s(&price.instance_type)),
        (ZONE.to_owned(), s(&price.zone)),
        (
            "usd_per_hour".to_owned(),
            AttributeValue::N(price.usd_per_hour.to_string()),
        ),
        ("read_at".to_owned(), s(&timestamp(price.read_at))),
    ]))
}

fn spot_prices_from_item(item: &Item) -> Result<Vec<SpotPrice>, Error> {
    let Some(map) = item.get(SPOT_PRICES).and_then(|v| v.as_m().ok()) else {
        return Ok(Vec::new());
    };
    let mut prices = map
        .values()
        .map(|value| {
            let fields = value
                .as_m()
                .map_err(|_| Error::malformed("run", "a spot price is not a map"))?;
            Ok(SpotPrice {
                instance_type: req_s(fields, "instance_type")?,
                zone: req_s(fields, ZONE)?,
                usd_per_hour: fields
                    .get("usd_per_hour")
                    .and_then(|v| v.as_n().ok())
                    .and_then(|n| n.parse().ok())
                    .ok_or_else(|| Error::malformed("run", "a spot price has no price"))?,
                read_at: opt_time(fields, "read_at")?
                    .ok_or_else(|| Error::malformed("run", "a spot price has no time"))?,
            })
        })
        .collect::<Result<Vec<_>, Error>>()?;
    prices.sort_by(|a, b| (&a.instance_type, &a.zone).cmp(&(&b.instance_type, &b.zone)));
    Ok(prices)
}

pub(super) fn launched_value(launched: &Launched) -> AttributeValue {
    let mut fields = HashMap::from([(
        "launched_at".to_owned(),
        s(&timestamp(launched.launched_at)),
    )]);
    if let Some(instance_type) = &launched.instance_type {
        fields.insert("instance_type".to_owned(), s(instance_type));
    }
    if let Some(lifecycle) = &launched.lifecycle {
        fields.insert("lifecycle".to_owned(), s(lifecycle));
    }
    if let Some(zone) = &launched.zone {
        fields.insert(ZONE.to_owned(), s(zone));
    }
    fields.insert(SLOTS.to_owned(), num(u64::from(launched.slots)));
    if let Some(reason) = &launched.reason {
        fields.insert(REASON.to_owned(), s(reason));
    }
    if let Some(ended_at) = launched.ended_at {
        fields.insert(ENDED_AT.to_owned(), s(&timestamp(ended_at)));
    }
    AttributeValue::M(fields)
}

fn launches_from_item(item: &Item) -> Result<Vec<Launched>, Error> {
    let Some(map) = item.get(INSTANCES).and_then(|v| v.as_m().ok()) else {
        return Ok(Vec::new());
    };
    let tasks_ended = item.get(INSTANCE_TASKS).and_then(|v| v.as_m().ok());
    let busy_ms = item.get(INSTANCE_BUSY_MS).and_then(|v| v.as_m().ok());
    let count_of = |map: Option<&Item>, id: &str| {
        map.map_or(Ok(None), |m| opt_n(m, id))
            .map(Option::unwrap_or_default)
    };
    let mut launches = map
        .iter()
        .map(|(id, value)| {
            let fields = value
                .as_m()
                .map_err(|_| Error::malformed("run", "an instance entry is not a map"))?;
            Ok(Launched {
                id: id.clone(),
                launched_at: opt_time(fields, "launched_at")?
                    .ok_or_else(|| Error::malformed("run", "an instance has no launch time"))?,
                instance_type: opt_s(fields, "instance_type"),
                lifecycle: opt_s(fields, "lifecycle"),
                zone: opt_s(fields, ZONE),
                ended_at: opt_time(fields, ENDED_AT)?,
                slots: count(fields, SLOTS)?.max(1),
                tasks: count_of(tasks_ended, id)?,
                busy_ms: count_of(busy_ms, id)?,
                reason: opt_s(fields, REASON),
            })
        })
        .collect::<Result<Vec<_>, Error>>()?;
    launches.sort_by(|a, b| (a.launched_at, &a.id).cmp(&(b.launched_at, &b.id)));
    Ok(launches)
}

pub(super) fn run_from_item(item: &Item) -> Result<Run, Error> {
    let state = req_s(item, STATE)?;
    Ok(Run {
        id: req_s(item, ID)?,
        state: RunState::parse(&state).ok_or_else(|| Error::malformed("run state", state))?,
        started_at: opt_time(item, STARTED_AT)?
            .ok_or_else(|| Error::malformed("run", "no started_at"))?,
        deadline: opt_time(item, DEADLINE)?
            .ok_or_else(|| Error::malformed("run", "no deadline"))?,
        finished_at: opt_time(item, FINISHED_AT)?,
        queued: opt_n(item, QUEUED)?.unwrap_or(0),
        done: opt_n(item, DONE)?.unwrap_or(0),
        failed: opt_n(item, FAILED)?.unwrap_or(0),
        cancelled: opt_n(item, CANCELLED)?.unwrap_or(0),
        late: opt_n(item, LATE)?.unwrap_or(0),
        instances: launches_from_item(item)?,
        fleet_requests: count(item, FLEET_REQUESTS)?,
        waiting: item
            .get(WAITING)
            .and_then(|v| v.as_bool().ok())
            .copied()
            .unwrap_or(false),
        spot_prices: spot_prices_from_item(item)?,
        usage: Usage {
            calls: item
                .iter()
                .filter_map(|(name, value)| {
                    let call = name.strip_prefix(CALLS_PREFIX)?;
                    Some((call.to_owned(), value.as_n().ok()?.parse().ok()?))
                })
                .collect(),
            ..item
                .get(USAGE)
                .and_then(|v| v.as_m().ok())
                .map(|fields| {
                    Usage::from_fields(|name| {
                        fields
                            .get(name)
                            .and_then(|v| v.as_n().ok())
                            .and_then(|n| n.parse().ok())
                    })
                })
                .unwrap_or_default()
        },
        kernels: kernels_from_item(item)?,
        // A plan is for display: one this code cannot read is left out.
        plan: opt_s(item, PLAN).and_then(|text| {
            serde_json::from_str(&text)
                .inspect_err(|error| tracing::warn!(%error, "a run's plan is unreadable"))
                .ok()
        }),
    })
}

fn kernels_from_item(item: &Item) -> Result<Vec<KernelStats>, Error> {
    let prefix = kernel_counter(KERNEL_QUEUED, "");
    let mut kernels: Vec<&str> = item
        .keys()
        .filter_map(|name| name.strip_prefix(prefix.as_str()))
        .collect();
    kernels.sort_unstable();
    let of = |counter: &str, kernel: &str| {
        opt_n(item, &kernel_counter(counter, kernel)).map(Option::unwrap_or_default)
    };
    kernels
        .into_iter()
        .map(|kernel| {
            Ok(KernelStats {
                kernel: kernel.to_owned(),
                queued: of(KERNEL_QUEUED, kernel)?,
                ended: of(KERNEL_ENDED, kernel)?,
                busy_ms: of(KERNEL_BUSY_MS, kernel)?,
            })
        })
        .collect()
}

/// A paging cursor from a `LastEvaluatedKey` (string attributes only, as
/// every key of this table is), and back.
pub(super) fn cursor_of(key: Option<Item>) -> Option<crate::ports::Cursor> {
    let key = key?;
    let strings: std::collections::BTreeMap<String, String> = key
        .iter()
        .filter_map(|(name, value)| Some((name.clone(), value.as_s().ok()?.clone())))
        .collect();
    Some(crate::ports::Cursor(
        serde_json::to_string(&strings).unwrap_or_default(),
    ))
}

pub(super) fn start_key(cursor: Option<&crate::ports::Cursor>) -> Result<Option<Item>, Error> {
    let Some(cursor) = cursor else {
        return Ok(None);
    };
    let strings: std::collections::BTreeMap<String, String> =
        serde_json::from_str(&cursor.0).map_err(|e| Error::malformed("cursor", e))?;
    Ok(Some(
        strings.iter().map(|(k, v)| (k.clone(), s(v))).collect(),
    ))
}
