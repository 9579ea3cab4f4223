//! The Grafana dashboards in `dashboards/`, read from their JSON: every panel's PromQL
//! (so tests evaluate exactly what Grafana would, never a copy) and the structural
//! rules a portable dashboard must follow (datasource through the `datasource`
//! variable, no hard-coded datasource uid, unique panel ids, and every gateway metric
//! filtered by the `node` variable).
use std::path::{Path, PathBuf};

use serde_json::Value;

/// The name of the dashboard variable every panel takes its datasource from.
pub const DATASOURCE_VARIABLE: &str = "datasource";
/// The datasource uid every panel and query must carry: the variable, never a uid.
pub const DATASOURCE_UID: &str = "${datasource}";
/// The name of the dashboard variable that picks the gateway nodes to show.
pub const NODE_VARIABLE: &str = "node";
/// The label the `node` variable lists and filters on: Prometheus' `instance`, one
/// per scraped gateway (name it after the node's `--node-id` in the scrape config).
pub const NODE_LABEL: &str = "instance";
/// The matcher every selector of a gateway metric carries.
pub const NODE_MATCHER: &str = r#"instance=~"$node""#;
/// What `$node` stands for when "All" is picked: every instance, agents included.
pub const NODE_ALL_VALUE: &str = ".*";
/// Metrics only agents serve (`gateway peer --metrics-listen`): an agent belongs to
/// no node (it fails over between them), so these are exempt from the node filter.
pub const AGENT_ONLY_METRIC_PREFIX: &str = "gateway_peer_";
/// The prefix of every metric the project exports.
pub const METRIC_PREFIX: &str = "gateway_";

/// Why a dashboard could not be used.
#[derive(Debug, thiserror::Error)]
pub enum DashboardError {
    /// The file could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The file is not JSON.
    #[error("{file} is not JSON: {source}")]
    Json {
        /// The file.
        file: String,
        /// The parser's error.
        source: serde_json::Error,
    },
    /// The dashboard breaks the rules (every problem found, one per line).
    #[error("{file} is not a valid dashboard:\n{}", problems.join("\n"))]
    Invalid {
        /// The file.
        file: String,
        /// What is wrong.
        problems: Vec<String>,
    },
    /// A query uses a variable that has no value outside Grafana.
    #[error("expression {expr:?} uses an unknown variable: {rest:?}")]
    UnknownVariable {
        /// The expression.
        expr: String,
        /// The expression from the unknown variable on.
        rest: String,
    },
}

/// One panel that queries Prometheus.
#[derive(Clone, Debug, PartialEq)]
pub struct Panel {
    /// Its id (unique within the dashboard).
    pub id: u64,
    /// Its title, as shown in Grafana.
    pub title: String,
    /// Its visualisation (`timeseries`, `stat`, ...).
    pub kind: String,
    /// The PromQL of each of its queries, as written (with Grafana's variables).
    pub exprs: Vec<String>,
}

/// A `label_values(SELECTOR, LABEL)` variable query: Grafana lists the values of
/// `label` among the series `selector` matches.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LabelValues {
    /// The series selector (e.g. `gateway_registered_peers`).
    pub selector: String,
    /// The label whose values are listed.
    pub label: String,
}

impl LabelValues {
    /// Parses `label_values(SELECTOR, LABEL)` (the form with a selector).
    pub fn parse(query: &str) -> Option<Self> {
        let inner = query
            .trim()
            .strip_prefix("label_values(")?
            .strip_suffix(')')?;
        let (selector, label) = inner.rsplit_once(',')?;
        let (selector, label) = (selector.trim(), label.trim());
        let is_name =
            !label.is_empty() && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        (is_name && !selector.is_empty()).then(|| Self {
            selector: selector.to_owned(),
            label: label.to_owned(),
        })
    }
}

/// A dashboard file: its title, its `node` variable's query and its querying panels
/// (rows left out).
#[derive(Clone, Debug, PartialEq)]
pub struct Dashboard {
    /// The file name (e.g. `punching.json`).
    pub file: String,
    /// The dashboard's title.
    pub title: String,
    /// What the `node` variable lists.
    pub node_values: LabelValues,
    /// Every panel with queries, in file order.
    pub panels: Vec<Panel>,
}

/// The repository's `dashboards/` directory.
pub fn dashboards_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(|root| root.join("dashboards"))
        .unwrap_or_else(|| PathBuf::from("dashboards"))
}

/// Names of the dashboard files (`*.json`) in `dir`, sorted.
pub fn dashboard_files(dir: &Path) -> Result<Vec<String>, DashboardError> {
    let read = |source| DashboardError::Read {
        path: dir.to_owned(),
        source,
    };
    let mut files: Vec<String> = std::fs::read_dir(dir)
        .map_err(read)?
        .filter_map(Result::ok)
        .filter_map(|entry| entry.file_name().to_str().map(str::to_owned))
        .filter(|name| name.ends_with(".json"))
        .collect();
    files.sort();
    Ok(files)
}

/// Reads and validates `dir/file`.
pub fn load(dir: &Path, file: &str) -> Result<Dashboard, DashboardError> {
    let path = dir.join(file);
    let text = std::fs::read_to_string(&path).map_err(|source| DashboardError::Read {
        path: path.clone(),
        source,
    })?;
    parse(file, &text)
}

/// Parses and validates a dashboard's JSON text; `file` names it in errors.
pub fn parse(file: &str, text: &str) -> Result<Dashboard, DashboardError> {
    let json: Value = serde_json::from_str(text).map_err(|source| DashboardError::Json {
        file: file.to_owned(),
        source,
    })?;
    let problems = problems(&json);
    if !problems.is_empty() {
        return Err(DashboardError::Invalid {
            file: file.to_owned(),
            problems,
        });
    }
    let panels = all_panels(&json)
        .into_iter()
        .filter(|p| p.get("type").and_then(Value::as_str) != Some("row"))
        .map(|p| Panel {
            id: p.get("id").and_then(Value::as_u64).unwrap_or_default(),
            title: str_field(p, "title").to_owned(),
            kind: str_field(p, "type").to_owned(),
            exprs: targets(p)
                .iter()
                .map(|t| str_field(t, "expr").to_owned())
                .collect(),
        })
        .collect();
    let node_values = node_variable(&json)
        .and_then(variable_query)
        .and_then(LabelValues::parse)
        .ok_or_else(|| DashboardError::Invalid {
            file: file.to_owned(),
            problems: vec!["no `node` variable query".into()],
        })?;
    Ok(Dashboard {
        file: file.to_owned(),
        title: str_field(&json, "title").to_owned(),
        node_values,
        panels,
    })
}

fn node_variable(json: &Value) -> Option<&Value> {
    json.pointer("/templating/list")
        .and_then(Value::as_array)?
        .iter()
        .find(|v| str_field(v, "name") == NODE_VARIABLE)
}

/// A query variable's query: a string, or (newer Grafana) an object with `query`.
fn variable_query(variable: &Value) -> Option<&str> {
    let query = variable.get("query")?;
    query
        .as_str()
        .or_else(|| query.get("query").and_then(Value::as_str))
}

fn str_field<'a>(value: &'a Value, name: &str) -> &'a str {
    value.get(name).and_then(Value::as_str).unwrap_or_default()
}

fn targets(panel: &Value) -> Vec<&Value> {
    panel
        .get("targets")
        .and_then(Value::as_array)
        .map(|t| t.iter().collect())
        .unwrap_or_default()
}

/// Every panel, including those inside collapsed rows.
fn all_panels(json: &Value) -> Vec<&Value> {
    let mut out = Vec::new();
    for panel in json
        .get("panels")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        out.push(panel);
        out.extend(
            panel
                .get("panels")
                .and_then(Value::as_array)
                .into_iter()
                .flatten(),
        );
    }
    out
}

/// Everything that keeps `json` from being a portable gateway dashboard; empty when
/// it is one.
pub fn problems(json: &Value) -> Vec<String> {
    let mut problems = Vec::new();
    for field in ["title", "uid"] {
        if str_field(json, field).is_empty() {
            problems.push(format!("the dashboard has no {field}"));
        }
    }
    let variables = json
        .pointer("/templating/list")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let has_variable = variables.iter().any(|v| {
        str_field(v, "name") == DATASOURCE_VARIABLE
            && str_field(v, "type") == "datasource"
            && str_field(v, "query") == "prometheus"
    });
    if !has_variable {
        problems.push(format!(
            "no `{DATASOURCE_VARIABLE}` variable of type datasource querying prometheus"
        ));
    }
    problems.extend(node_variable_problems(node_variable(json)));
    let panels = all_panels(json);
    if panels.is_empty() {
        problems.push("no panels".into());
    }
    let mut ids = std::collections::BTreeSet::new();
    for panel in &panels {
        let title = str_field(panel, "title");
        let name = format!("panel {title:?}");
        match panel.get("id").and_then(Value::as_u64) {
            Some(id) if !ids.insert(id) => problems.push(format!("{name}: id {id} is not unique")),
            Some(_) => {}
            None => problems.push(format!("{name}: no numeric id")),
        }
        if title.is_empty() {
            problems.push(format!("a panel (id {:?}) has no title", panel.get("id")));
        }
        match panel.get("gridPos") {
            Some(pos) => {
                let n = |k: &str| pos.get(k).and_then(Value::as_u64);
                match (n("x"), n("y"), n("w"), n("h")) {
                    (Some(x), Some(_), Some(w), Some(h)) if w > 0 && h > 0 && x + w <= 24 => {}
                    _ => problems.push(format!("{name}: gridPos {pos} is outside the 24 columns")),
                }
            }
            None => problems.push(format!("{name}: no gridPos")),
        }
        if str_field(panel, "type") == "row" {
            continue;
        }
        if !is_variable_datasource(panel.get("datasource")) {
            problems.push(format!(
                "{name}: datasource must be {{\"type\": \"prometheus\", \"uid\": \"{DATASOURCE_UID}\"}}"
            ));
        }
        let targets = targets(panel);
        if targets.is_empty() {
            problems.push(format!("{name}: no queries"));
        }
        let mut ref_ids = std::collections::BTreeSet::new();
        for target in targets {
            let expr = str_field(target, "expr");
            if expr.trim().is_empty() {
                problems.push(format!("{name}: a query has no expr"));
            }
            let ref_id = str_field(target, "refId");
            let unfiltered = unfiltered_selectors(expr);
            if !unfiltered.is_empty() {
                problems.push(format!(
                    "{name}: query {ref_id} reads {} without {NODE_MATCHER}",
                    unfiltered.join(", ")
                ));
            }
            if ref_id.is_empty() || !ref_ids.insert(ref_id) {
                problems.push(format!("{name}: refId {ref_id:?} missing or repeated"));
            }
            if target.get("datasource").is_some()
                && !is_variable_datasource(target.get("datasource"))
            {
                problems.push(format!(
                    "{name}: query {ref_id} has a datasource other than {DATASOURCE_UID}"
                ));
            }
        }
    }
    find_hard_coded_datasources(json, "", &mut problems);
    problems
}

/// What is wrong with the `node` variable (`variable`, if any): a query variable on
/// `${datasource}` listing `label_values(..., instance)`, several values or All
/// (`.*`) pickable.
fn node_variable_problems(variable: Option<&Value>) -> Vec<String> {
    let Some(variable) = variable else {
        return vec![format!("no `{NODE_VARIABLE}` variable")];
    };
    let mut problems = Vec::new();
    let what = format!("variable `{NODE_VARIABLE}`");
    if str_field(variable, "type") != "query" {
        problems.push(format!("{what} must be of type query"));
    }
    if !is_variable_datasource(variable.get("datasource")) {
        problems.push(format!(
            "{what}: datasource must be {{\"type\": \"prometheus\", \"uid\": \"{DATASOURCE_UID}\"}}"
        ));
    }
    match variable_query(variable).and_then(LabelValues::parse) {
        Some(query) if query.label == NODE_LABEL => {}
        _ => problems.push(format!(
            "{what} must query label_values(SELECTOR, {NODE_LABEL})"
        )),
    }
    let flag = |name: &str| variable.get(name).and_then(Value::as_bool) == Some(true);
    if !flag("includeAll") || !flag("multi") {
        problems.push(format!("{what} must allow All and several values"));
    }
    if str_field(variable, "allValue") != NODE_ALL_VALUE {
        problems.push(format!(
            "{what}: allValue must be {NODE_ALL_VALUE:?} (every instance, even one whose series are gone)"
        ));
    }
    problems
}

/// The metrics of `expr` (names starting with [`METRIC_PREFIX`], agent-only ones
/// left out) read by a selector without [`NODE_MATCHER`] in its braces, in order.
pub fn unfiltered_selectors(expr: &str) -> Vec<String> {
    let bytes = expr.as_bytes();
    let is_ident = |b: u8| b.is_ascii_alphanumeric() || b == b'_' || b == b':';
    let mut out = Vec::new();
    let mut i = 0;
    while let Some(&c) = bytes.get(i) {
        match c {
            b'"' | b'\'' | b'`' => i = string_end(bytes, i) + 1,
            // Matchers without a metric name before them: nothing to check here.
            b'{' => i = braces_end(bytes, i) + 1,
            c if c.is_ascii_alphabetic() || c == b'_' => {
                let start = i;
                while bytes.get(i).copied().is_some_and(is_ident) {
                    i += 1;
                }
                let name = expr.get(start..i).unwrap_or_default();
                if !name.starts_with(METRIC_PREFIX) || name.starts_with(AGENT_ONLY_METRIC_PREFIX) {
                    continue;
                }
                let mut j = i;
                while bytes.get(j).is_some_and(u8::is_ascii_whitespace) {
                    j += 1;
                }
                let filtered = bytes.get(j) == Some(&b'{') && {
                    let end = braces_end(bytes, j);
                    i = end + 1;
                    expr.get(j + 1..end)
                        .unwrap_or_default()
                        .contains(NODE_MATCHER)
                };
                if !filtered {
                    out.push(name.to_owned());
                }
            }
            _ => i += 1,
        }
    }
    out
}

/// The index of the quote closing the string that opens at `start` (or the end).
fn string_end(bytes: &[u8], start: usize) -> usize {
    let quote = bytes.get(start).copied().unwrap_or_default();
    let mut i = start + 1;
    while let Some(&c) = bytes.get(i) {
        if c == b'\\' && quote != b'`' {
            i += 2;
            continue;
        }
        if c == quote {
            return i;
        }
        i += 1;
    }
    bytes.len()
}

/// The index of the `}` closing the braces that open at `start` (or the end).
fn braces_end(bytes: &[u8], start: usize) -> usize {
    let mut i = start + 1;
    while let Some(&c) = bytes.get(i) {
        match c {
            b'}' => return i,
            b'"' | b'\'' | b'`' => i = string_end(bytes, i) + 1,
            _ => i += 1,
        }
    }
    bytes.len()
}

fn is_variable_datasource(datasource: Option<&Value>) -> bool {
    datasource.is_some_and(|d| {
        str_field(d, "type") == "prometheus" && str_field(d, "uid") == DATASOURCE_UID
    })
}

/// Any `datasource` anywhere that names a datasource instead of the variable (a uid,
/// or the legacy form: a datasource's name as a string).
fn find_hard_coded_datasources(value: &Value, at: &str, problems: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            for (key, child) in map {
                let path = format!("{at}/{key}");
                if key == "datasource" {
                    match child {
                        Value::Object(ds) => {
                            if let Some(uid) = ds.get("uid")
                                && uid.as_str() != Some(DATASOURCE_UID)
                            {
                                problems.push(format!("{path}: hard-coded datasource uid {uid}"));
                            }
                        }
                        Value::String(name) if name != DATASOURCE_UID => {
                            problems.push(format!("{path}: hard-coded datasource {name:?}"));
                        }
                        _ => {}
                    }
                }
                find_hard_coded_datasources(child, &path, problems);
            }
        }
        Value::Array(items) => {
            for (i, child) in items.iter().enumerate() {
                find_hard_coded_datasources(child, &format!("{at}/{i}"), problems);
            }
        }
        _ => {}
    }
}

/// Grafana's built-in interval variables, which Grafana replaces with durations
/// before a query reaches Prometheus.
pub const GRAFANA_INTERVAL_VARIABLES: [&str; 3] = ["__rate_interval", "__interval", "__range"];

/// `expr` as Grafana would send it to Prometheus with every interval variable
/// (`$__rate_interval`, `$__interval`, `$__range`, also as `${...}`) set to `window`
/// (a PromQL duration such as `1m`) and `$node` set to `node` (a regex as Grafana
/// writes it into the query: [`NODE_ALL_VALUE`] for All, else [`node_regex`]); any
/// other variable is an error, since a test cannot know its value.
pub fn substitute_variables(
    expr: &str,
    window: &str,
    node: &str,
) -> Result<String, DashboardError> {
    let unknown = |rest: &str| DashboardError::UnknownVariable {
        expr: expr.to_owned(),
        rest: rest.to_owned(),
    };
    let mut out = String::with_capacity(expr.len());
    let mut rest = expr;
    while let Some(at) = rest.find('$') {
        out.push_str(rest.get(..at).unwrap_or_default());
        let variable = rest.get(at..).unwrap_or_default();
        let (name, len) = match variable.strip_prefix("${") {
            Some(braced) => {
                let end = braced.find('}').ok_or_else(|| unknown(variable))?;
                (braced.get(..end).unwrap_or_default(), end + 3)
            }
            None => {
                let name = variable.get(1..).unwrap_or_default();
                let end = name
                    .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                    .unwrap_or(name.len());
                (name.get(..end).unwrap_or_default(), end + 1)
            }
        };
        if GRAFANA_INTERVAL_VARIABLES.contains(&name) {
            out.push_str(window);
        } else if name == NODE_VARIABLE {
            out.push_str(node);
        } else {
            return Err(unknown(variable));
        }
        rest = variable.get(len..).unwrap_or_default();
    }
    out.push_str(rest);
    Ok(out)
}

/// `$node` as Grafana writes it into a regex matcher when `instances` are picked:
/// each value with its regex metacharacters escaped (as it appears inside a PromQL
/// string, so a `.` becomes `\\.`), several joined as `(a|b)`.
pub fn node_regex(instances: &[&str]) -> String {
    let escaped: Vec<String> = instances
        .iter()
        .map(|value| {
            let mut out = String::with_capacity(value.len() * 2);
            for c in value.chars() {
                if c == '\\' {
                    out.push_str("\\\\\\\\");
                    continue;
                }
                if "$^*+?.()|{}[]'".contains(c) {
                    out.push_str("\\\\");
                }
                out.push(c);
            }
            out
        })
        .collect();
    match escaped.as_slice() {
        [one] => one.clone(),
        _ => format!("({})", escaped.join("|")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn minimal() -> Value {
        serde_json::json!({
            "uid": "test",
            "title": "Test",
            "templating": {"list": [
                {"name": "datasource", "type": "datasource", "query": "prometheus"},
                {"name": "node", "type": "query",
                 "datasource": {"type": "prometheus", "uid": "${datasource}"},
                 "query": "label_values(gateway_registered_peers, instance)",
                 "includeAll": true, "multi": true, "allValue": ".*"}
            ]},
            "panels": [
                {"id": 1, "type": "row", "title": "Row",
                 "gridPos": {"x": 0, "y": 0, "w": 24, "h": 1}, "panels": []},
                {"id": 2, "type": "timeseries", "title": "Rate",
                 "gridPos": {"x": 0, "y": 1, "w": 12, "h": 8},
                 "datasource": {"type": "prometheus", "uid": "${datasource}"},
                 "targets": [{"refId": "A", "expr": "sum(rate(gateway_x_total{instance=~\"$node\"}[$__rate_interval]))",
                              "datasource": {"type": "prometheus", "uid": "${datasource}"}}]}
            ]
        })
    }

    fn problems_after(change: impl FnOnce(&mut Value)) -> Vec<String> {
        let mut json = minimal();
        change(&mut json);
        problems(&json)
    }

    #[test]
    fn a_portable_dashboard_parses_into_its_queries() {
        assert_eq!(problems(&minimal()), Vec::<String>::new());
        let dashboard = parse("t.json", &minimal().to_string()).expect("valid");
        assert_eq!(dashboard.title, "Test");
        assert_eq!(
            dashboard.node_values,
            LabelValues {
                selector: "gateway_registered_peers".into(),
                label: "instance".into()
            }
        );
        assert_eq!(
            dashboard.panels,
            vec![Panel {
                id: 2,
                title: "Rate".into(),
                kind: "timeseries".into(),
                exprs: vec![
                    "sum(rate(gateway_x_total{instance=~\"$node\"}[$__rate_interval]))".into()
                ],
            }]
        );
    }

    #[test]
    fn hard_coded_datasources_are_refused() {
        let found =
            problems_after(|j| j["panels"][1]["datasource"]["uid"] = "P1809F7CD0C75ACF3".into());
        assert!(
            found
                .iter()
                .any(|p| p.contains("hard-coded datasource uid")),
            "{found:?}"
        );
        let found =
            problems_after(|j| j["panels"][1]["targets"][0]["datasource"] = "Prometheus".into());
        assert!(
            found
                .iter()
                .any(|p| p.contains("hard-coded datasource \"Prometheus\"")),
            "{found:?}"
        );
        let found = problems_after(|j| {
            j["annotations"] = serde_json::json!({"list": [{"datasource": {"uid": "abc"}}]})
        });
        assert!(
            found
                .iter()
                .any(|p| p.starts_with("/annotations/list/0/datasource")),
            "{found:?}"
        );
    }

    #[test]
    fn structural_mistakes_are_each_reported() {
        let found = problems_after(|j| j["panels"][1]["id"] = 1.into());
        assert!(
            found.iter().any(|p| p.contains("id 1 is not unique")),
            "{found:?}"
        );
        let found = problems_after(|j| j["templating"]["list"] = serde_json::json!([]));
        assert!(
            found.iter().any(|p| p.contains("`datasource` variable")),
            "{found:?}"
        );
        let found = problems_after(|j| j["panels"][1]["targets"] = serde_json::json!([]));
        assert!(found.iter().any(|p| p.contains("no queries")), "{found:?}");
        let found = problems_after(|j| j["panels"][1]["gridPos"]["x"] = 20.into());
        assert!(
            found.iter().any(|p| p.contains("outside the 24 columns")),
            "{found:?}"
        );
        let found = problems_after(|j| {
            j["panels"][1]["datasource"] =
                serde_json::json!({"type": "loki", "uid": "${datasource}"})
        });
        assert!(
            found.iter().any(|p| p.contains("datasource must be")),
            "{found:?}"
        );
        assert!(matches!(
            parse("bad.json", "{"),
            Err(DashboardError::Json { .. })
        ));
    }

    #[test]
    fn panels_inside_collapsed_rows_are_found() {
        let mut json = minimal();
        let inner = json["panels"][1].clone();
        json["panels"] = serde_json::json!([{
            "id": 1, "type": "row", "title": "Row", "collapsed": true,
            "gridPos": {"x": 0, "y": 0, "w": 24, "h": 1}, "panels": [inner]
        }]);
        let dashboard = parse("t.json", &json.to_string()).expect("valid");
        assert_eq!(dashboard.panels.len(), 1);
    }

    #[test]
    fn variables_are_substituted_and_unknown_ones_refused() {
        assert_eq!(
            substitute_variables(
                "increase(x{instance=~\"$node\"}[$__range]) / rate(y{instance=~\"${node}\"}[${__rate_interval}])",
                "1m",
                ".*"
            )
            .expect("known"),
            "increase(x{instance=~\".*\"}[1m]) / rate(y{instance=~\".*\"}[1m])"
        );
        let error =
            substitute_variables("x{instance=\"$instance\"}", "1m", ".*").expect_err("unknown");
        assert!(error.to_string().contains("$instance"), "{error}");
        // A longer name that starts like a known one is not that one.
        assert!(substitute_variables("x[$__interval_ms]", "1m", ".*").is_err());
        assert!(substitute_variables("x{a=~\"$nodes\"}", "1m", ".*").is_err());
        assert!(substitute_variables("x[${__range", "1m", ".*").is_err());
    }

    #[test]
    fn node_values_are_escaped_as_grafana_escapes_them() {
        assert_eq!(node_regex(&["node-a"]), "node-a");
        assert_eq!(node_regex(&["127.0.0.1:9478"]), r"127\\.0\\.0\\.1:9478");
        assert_eq!(node_regex(&["a", "b(1)"]), r"(a|b\\(1\\))");
    }

    #[test]
    fn every_gateway_selector_must_carry_the_node_filter() {
        let m = NODE_MATCHER;
        assert_eq!(
            unfiltered_selectors(&format!(
                "sum(a_total) + count by (version) (gateway_build_info{{{m}}} and on (job, instance) gateway_registered_peers)"
            )),
            vec!["gateway_registered_peers"]
        );
        assert_eq!(
            unfiltered_selectors(&format!(
                "sum(rate(gateway_s_total{{outcome=~\"a|b}}\", {m}}}[5m])) / sum(gateway_peer_sessions_total) + gateway_t {{job=\"gateway_x\"}}"
            )),
            vec!["gateway_t"],
            "agent-only metrics are exempt; strings and braces are not metric names"
        );
        assert_eq!(
            unfiltered_selectors(&format!(
                "histogram_quantile(0.5, sum by (le) (rate(gateway_h_bucket{{{m}}}[1m])))"
            )),
            Vec::<String>::new()
        );
        let found = problems_after(|j| {
            j["panels"][1]["targets"][0]["expr"] = "sum(rate(gateway_x_total[5m]))".into()
        });
        assert!(
            found
                .iter()
                .any(|p| p.contains("reads gateway_x_total without instance=~")),
            "{found:?}"
        );
    }

    #[test]
    fn the_node_variable_is_required_and_must_allow_all() {
        let found = problems_after(|j| {
            j["templating"]["list"]
                .as_array_mut()
                .expect("list")
                .truncate(1)
        });
        assert!(found.iter().any(|p| p == "no `node` variable"), "{found:?}");
        let found = problems_after(|j| j["templating"]["list"][1]["allValue"] = "".into());
        assert!(found.iter().any(|p| p.contains("allValue")), "{found:?}");
        let found = problems_after(|j| {
            j["templating"]["list"][1]["query"] =
                "label_values(gateway_registered_peers, job)".into()
        });
        assert!(
            found
                .iter()
                .any(|p| p.contains("label_values(SELECTOR, instance)")),
            "{found:?}"
        );
        // Newer Grafana stores the query as an object.
        let found = problems_after(|j| {
            j["templating"]["list"][1]["query"] = serde_json::json!({
                "query": "label_values(gateway_registered_peers, instance)",
                "refId": "PrometheusVariableQueryEditor-VariableQuery"
            })
        });
        assert_eq!(found, Vec::<String>::new());
        assert_eq!(
            LabelValues::parse("label_values(up{job=\"a,b\"}, instance)"),
            Some(LabelValues {
                selector: "up{job=\"a,b\"}".into(),
                label: "instance".into()
            })
        );
        assert_eq!(LabelValues::parse("label_values(instance)"), None);
        assert_eq!(LabelValues::parse("query_result(up)"), None);
    }
}
