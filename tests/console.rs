//! The README's guide to the DynamoDB console, run: every `aws dynamodb
//! query` command of its section is read from the README, sent through the
//! SDK with the same parameters against a local stack after a night, and its
//! answer checked against the night, so the guide cannot rot.

// A failed step should fail the test at once, with its name.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use aws_sdk_dynamodb::types::AttributeValue;
use nightshift_e2e::{Stack, repository};
use serde_json::{Value, json};

const SECTION: &str = "## Finding things in the DynamoDB console";
/// The template's default `PendingShards`.
const SHARDS: u32 = 8;

/// A question of the guide and its command's parameters.
#[derive(Debug, Clone)]
struct Documented {
    question: String,
    arguments: HashMap<String, String>,
    backwards: bool,
}

/// The guide's questions (`### ...`), each with its command.
fn documented() -> Vec<Documented> {
    let readme = std::fs::read_to_string(repository().join("README.md")).unwrap();
    let section = readme
        .split(SECTION)
        .nth(1)
        .unwrap_or_else(|| panic!("the README has no section {SECTION:?}"));
    let section = section.split("\n## ").next().unwrap();
    let mut found = Vec::new();
    for part in section.split("\n### ").skip(1) {
        let question = part.lines().next().unwrap().trim().to_owned();
        let command = part
            .split("```sh\n")
            .nth(1)
            .and_then(|rest| rest.split("```").next())
            .unwrap_or_else(|| panic!("{question}: no command"));
        let words = shell_words(&command.replace("\\\n", " "));
        assert_eq!(words[..3], ["aws", "dynamodb", "query"], "{question}");
        let mut arguments = HashMap::new();
        let mut backwards = false;
        let mut rest = words[3..].iter();
        while let Some(word) = rest.next() {
            if word == "--no-scan-index-forward" {
                backwards = true;
                continue;
            }
            let value = rest.next().unwrap_or_else(|| panic!("{question}: {word}"));
            arguments.insert(word.clone(), value.clone());
        }
        found.push(Documented {
            question,
            arguments,
            backwards,
        });
    }
    found
}

/// Words as a POSIX shell splits them, with single and double quotes.
fn shell_words(text: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut in_word = false;
    let mut quote: Option<char> = None;
    for c in text.chars() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some(_), c) => word.push(c),
            (None, '\'' | '"') => {
                quote = Some(c);
                in_word = true;
            }
            (None, c) if c.is_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut word));
                    in_word = false;
                }
            }
            (None, c) => {
                word.push(c);
                in_word = true;
            }
        }
    }
    if in_word {
        words.push(word);
    }
    words
}

/// Runs a documented query with its `<...>` parts replaced; every page.
async fn run(
    stack: &Stack,
    documented: &Documented,
    fill: &[(&str, &str)],
) -> Vec<HashMap<String, AttributeValue>> {
    let filled = |text: &str| {
        fill.iter().fold(text.to_owned(), |text, (hole, value)| {
            text.replace(hole, value)
        })
    };
    let argument = |name: &str| documented.arguments.get(name).map(|v| filled(v));
    let values: HashMap<String, Value> =
        serde_json::from_str(&argument("--expression-attribute-values").unwrap()).unwrap();
    let values: HashMap<String, AttributeValue> = values
        .into_iter()
        .map(|(name, value)| {
            let text = value["S"]
                .as_str()
                .unwrap_or_else(|| panic!("{}: {name} is not a string", documented.question));
            (name, AttributeValue::S(text.to_owned()))
        })
        .collect();
    let names: Option<HashMap<String, String>> =
        argument("--expression-attribute-names").map(|names| serde_json::from_str(&names).unwrap());
    let mut items = Vec::new();
    let mut start = None;
    loop {
        let output = stack
            .dynamodb
            .query()
            .table_name(argument("--table-name").unwrap())
            .set_index_name(argument("--index-name"))
            .key_condition_expression(argument("--key-condition-expression").unwrap())
            .set_filter_expression(argument("--filter-expression"))
            .set_expression_attribute_names(names.clone())
            .set_expression_attribute_values(Some(values.clone()))
            .scan_index_forward(!documented.backwards)
            .set_exclusive_start_key(start)
            .send()
            .await
            .unwrap_or_else(|e| panic!("{}: {e:?}", documented.question));
        items.extend(output.items().iter().cloned());
        start = output.last_evaluated_key;
        if start.is_none() {
            return items;
        }
    }
}

fn text(item: &HashMap<String, AttributeValue>, name: &str) -> String {
    item.get(name)
        .and_then(|v| v.as_s().ok())
        .cloned()
        .unwrap_or_default()
}

fn task_ids(items: &[HashMap<String, AttributeValue>]) -> BTreeSet<String> {
    items
        .iter()
        .map(|item| text(item, "pk").trim_start_matches("TASK#").to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn every_query_of_the_console_guide_answers_its_question() {
    let guide = documented();
    let question = |q: &str| {
        guide
            .iter()
            .find(|d| d.question == q)
            .unwrap_or_else(|| panic!("the guide has no {q:?}"))
            .clone()
    };
    assert_eq!(guide.len(), 7, "{guide:#?}");

    let stack = Stack::start(&[]).await;
    let table = stack.env["NIGHTSHIFT_TABLE"].clone();
    let night = stack
        .submit(&[
            json!({"account": "console-a", "kernel": "sleep", "payload": {"seconds": 0.2}}),
            json!({"account": "console-a", "kernel": "sleep", "payload": {"seconds": 0.2}}),
            json!({"account": "console-b", "kernel": "sleep", "payload": {"seconds": 0.2}}),
            json!({"account": "console-b", "kernel": "sleep",
                   "payload": {"seconds": 0, "fail": "bad input"}}),
        ])
        .await;
    let run_id = stack.start_run().await;

    let open = run(&stack, &question("The open run"), &[("<table>", &table)]).await;
    assert_eq!(
        open.iter()
            .map(|i| text(i, "current_run_id"))
            .collect::<Vec<_>>(),
        std::slice::from_ref(&run_id),
        "the open run"
    );

    let report = stack.finish(&run_id, Duration::from_secs(120)).await;
    let waiting = stack
        .submit(&[
            json!({"account": "console-c", "kernel": "sleep", "payload": {"seconds": 0}}),
            json!({"account": "console-c", "kernel": "sleep", "payload": {"seconds": 0}}),
        ])
        .await;
    let ask = |q: &'static str, holes: Vec<(&'static str, String)>| {
        let documented = question(q);
        let (stack, table) = (&stack, table.clone());
        async move {
            let mut fill: Vec<(&str, &str)> = vec![("<table>", table.as_str())];
            fill.extend(holes.iter().map(|(hole, value)| (*hole, value.as_str())));
            run(stack, &documented, &fill).await
        }
    };

    let of_run = ask("The tasks of a run", vec![("<run id>", run_id.clone())]).await;
    assert_eq!(task_ids(&of_run), night.iter().cloned().collect());

    let failed = ask(
        "The failed tasks of a run",
        vec![("<run id>", run_id.clone())],
    )
    .await;
    assert_eq!(task_ids(&failed), BTreeSet::from([night[3].clone()]));
    assert_eq!(text(&failed[0], "last_error"), "bad input");

    let line = report["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["status"] == "DONE")
        .unwrap();
    let instance = line["instance_id"].as_str().unwrap().to_owned();
    let expected: BTreeSet<String> = report["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["instance_id"] == instance.as_str())
        .map(|t| t["task_id"].as_str().unwrap().to_owned())
        .collect();
    let did = ask("What one instance did", vec![("<instance id>", instance)]).await;
    assert_eq!(task_ids(&did), expected);

    let account = ask(
        "The tasks of one account",
        vec![("<account>", "console-a".into())],
    )
    .await;
    assert_eq!(
        task_ids(&account),
        BTreeSet::from([night[0].clone(), night[1].clone()])
    );

    let runs = ask("Every run, newest first", vec![]).await;
    assert_eq!(text(&runs[0], "id"), run_id, "the newest run first");

    let mut pending = BTreeSet::new();
    for shard in 0..SHARDS {
        let items = ask(
            "Tonight's waiting work",
            vec![("<shard>", shard.to_string())],
        )
        .await;
        pending.extend(task_ids(&items));
    }
    assert_eq!(
        pending,
        waiting.into_iter().collect(),
        "tonight's waiting work"
    );

    let between = ask("The open run", vec![]).await;
    assert!(between.is_empty(), "no run is open between nights");
}

#[test]
fn commands_are_split_as_a_shell_splits_them() {
    assert_eq!(
        shell_words(r#"aws --a "x y" --b '{"k": "v"}' plain"#),
        ["aws", "--a", "x y", "--b", r#"{"k": "v"}"#, "plain"]
    );
}
