use std::path::Path;

use super::*;

const FILE: &str = "petrel.toml";

fn env(vars: &[(&str, &str)]) -> impl Iterator<Item = (String, String)> {
    let vars: Vec<_> = vars
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    vars.into_iter()
}

fn load(toml: Option<&str>, vars: &[(&str, &str)]) -> Result<Config, ConfigError> {
    Config::from_sources(toml.map(|text| (Path::new(FILE), text)), env(vars))
}

/// The problems of a load that must fail.
fn problems(toml: Option<&str>, vars: &[(&str, &str)]) -> Vec<String> {
    match load(toml, vars) {
        Ok(cfg) => panic!("expected a config error, loaded {cfg:?}"),
        Err(e) => e.problems(),
    }
}

fn assert_one_problem_mentions(problems: &[String], needles: &[&str]) {
    assert_eq!(problems.len(), 1, "{problems:#?}");
    for needle in needles {
        assert!(
            problems[0].contains(needle),
            "{:?} does not mention {needle:?}",
            problems[0]
        );
    }
}

#[test]
fn example_equals_default() {
    let example: Config = toml::from_str(EXAMPLE_TOML).expect("the example parses");
    assert_eq!(example, Config::default());
    assert_eq!(Config::to_toml_string(), EXAMPLE_TOML);
}

#[test]
fn example_names_every_key_with_a_comment() {
    let example: toml::Table = EXAMPLE_TOML.parse().expect("the example parses");
    let schema = Schema::new();
    for (section, fields) in &schema.defaults {
        let fields = fields.as_table().expect("sections are tables");
        let in_example = example.get(section).and_then(toml::Value::as_table);
        let in_example = in_example.unwrap_or_else(|| panic!("example lacks [{section}]"));
        for (field, default) in fields {
            assert_eq!(
                in_example.get(field),
                Some(default),
                "example {section}.{field}"
            );
        }
    }
    let lines: Vec<&str> = EXAMPLE_TOML.lines().collect();
    for (i, line) in lines.iter().enumerate() {
        if line.contains(" = ") && !line.starts_with('#') {
            assert!(
                i > 0 && lines[i - 1].starts_with("# "),
                "example line {} `{line}` has no comment above it",
                i + 1
            );
        }
    }
}

#[test]
fn no_sources_give_the_default() {
    let cfg = load(None, &[("HOME", "/root"), ("PETREL_BIN", "/x/petrel")]).expect("loads");
    assert_eq!(cfg, Config::default());
    assert_eq!(cfg.validate(), Ok(()));
}

#[test]
fn toml_overrides_defaults() {
    let toml = "[mqtt]\nmax_qos = 1\nqueue_overflow = \"drop-oldest\"\n[log]\nformat = \"json\"\n";
    let cfg = load(Some(toml), &[]).expect("loads");
    let mut expected = Config::default();
    expected.mqtt.max_qos = 1;
    expected.mqtt.queue_overflow = QueueOverflow::DropOldest;
    expected.log.format = LogFormat::Json;
    assert_eq!(cfg, expected);
}

#[test]
fn env_overrides_toml_and_defaults() {
    let toml = "[mqtt]\nmax_qos = 1\nretain_available = false\n";
    let vars = [
        ("PETREL_MQTT__MAX_QOS", "0"),
        ("PETREL_MQTT__ADDR", "127.0.0.1:0"),
        ("PETREL_MQTT__CLIENT_ID_PREFIX", "123"),
        ("PETREL_MQTT__QUEUE_OVERFLOW", "drop-oldest"),
        ("PETREL_ADMIN__ENABLED", "false"),
        ("PETREL_STORAGE__DATA_DIR", "/var/lib/petrel"),
        ("PETREL_LIMITS__MAX_CONNECTIONS", "1_000"),
        ("PETREL_LOG__LEVEL", "warn"),
        ("PETREL_CONFIG", "ignored.toml"),
        ("PETREL_MQTT_ADDR", "ignored, a flag's variable"),
    ];
    let cfg = load(Some(toml), &vars).expect("loads");
    let mut expected = Config::default();
    expected.mqtt.max_qos = 0;
    expected.mqtt.retain_available = false;
    expected.mqtt.addr = "127.0.0.1:0".parse().expect("addr");
    expected.mqtt.client_id_prefix = "123".to_owned();
    expected.mqtt.queue_overflow = QueueOverflow::DropOldest;
    expected.admin.enabled = false;
    expected.storage.data_dir = "/var/lib/petrel".into();
    expected.limits.max_connections = 1000;
    expected.log.level = "warn".to_owned();
    assert_eq!(cfg, expected);
}

#[test]
fn petrel_log_overrides_log_level() {
    let toml = "[log]\nlevel = \"debug\"\n";
    let vars = [
        ("PETREL_LOG__LEVEL", "warn"),
        (LOG_ENV, "petrel_node=trace"),
    ];
    let cfg = load(Some(toml), &vars).expect("loads");
    assert_eq!(cfg.log.level, "petrel_node=trace");
}

#[test]
fn unknown_toml_keys_are_rejected() {
    let found = problems(Some("[mqtt]\nmax_qoss = 1\n"), &[]);
    assert_one_problem_mentions(&found, &[FILE, "unknown key `mqtt.max_qoss`", "max_qos"]);

    let found = problems(Some("[mqttt]\naddr = \"0.0.0.0:1\"\n"), &[]);
    assert_one_problem_mentions(&found, &[FILE, "unknown section `mqttt`", "mqtt"]);

    let found = problems(Some("verbose = true\n"), &[]);
    assert_one_problem_mentions(&found, &[FILE, "unknown section `verbose`"]);

    let found = problems(Some("mqtt = 1\n"), &[]);
    assert_one_problem_mentions(&found, &[FILE, "`mqtt` must be a table"]);
}

#[test]
fn unknown_env_settings_are_rejected() {
    let found = problems(None, &[("PETREL_MQTT__MAX_QOSS", "1")]);
    assert_one_problem_mentions(&found, &["PETREL_MQTT__MAX_QOSS", "mqtt.max_qoss"]);

    let found = problems(None, &[("PETREL_NOPE__ADDR", "1")]);
    assert_one_problem_mentions(&found, &["PETREL_NOPE__ADDR", "unknown section `nope`"]);

    let found = problems(None, &[("PETREL_MQTT__ADDR__PORT", "1")]);
    assert_one_problem_mentions(&found, &["PETREL_MQTT__ADDR__PORT"]);
}

#[test]
fn bad_value_types_name_the_key() {
    let found = problems(Some("[mqtt]\nmax_qos = \"two\"\n"), &[]);
    assert_one_problem_mentions(&found, &[FILE, "`mqtt.max_qos`", "invalid type"]);

    let found = problems(Some("[mqtt]\naddr = \"localhost\"\n"), &[]);
    assert_one_problem_mentions(&found, &[FILE, "`mqtt.addr`"]);

    let found = problems(Some("[mqtt]\nqueue_overflow = \"drop-all\"\n"), &[]);
    assert_one_problem_mentions(&found, &["`mqtt.queue_overflow`", "drop-newest"]);

    let found = problems(Some("[mqtt]\nmax_qos = 300\n"), &[]);
    assert_one_problem_mentions(&found, &["`mqtt.max_qos`", "300"]);

    let found = problems(None, &[("PETREL_MQTT__MAX_QOS", "abc")]);
    assert_one_problem_mentions(&found, &["PETREL_MQTT__MAX_QOS=abc", "invalid type"]);

    let found = problems(None, &[("PETREL_ADMIN__ENABLED", "yes")]);
    assert_one_problem_mentions(&found, &["PETREL_ADMIN__ENABLED=yes", "`admin.enabled`"]);
}

#[test]
fn every_problem_is_reported() {
    let toml = "[mqtt]\nmax_qos = \"x\"\nnope = 1\n[limits]\nmax_topic_levels = -1\n";
    let vars = [("PETREL_LOG__FORMAT", "xml"), ("PETREL_X__Y", "1")];
    let found = problems(Some(toml), &vars);
    assert_eq!(found.len(), 5, "{found:#?}");
}

#[test]
fn toml_syntax_errors_give_a_location() {
    let found = problems(Some("[mqtt]\nmax_qos = = 1\n"), &[]);
    assert_one_problem_mentions(&found, &["petrel.toml:2:"]);
}

#[test]
fn missing_file_is_a_read_error() {
    let path = Path::new("/nonexistent/petrel-config-test.toml");
    let err = Config::load(Some(path), env(&[])).expect_err("the file does not exist");
    assert!(matches!(err, ConfigError::Read { .. }), "{err:?}");
    assert_one_problem_mentions(&err.problems(), &["read config file", "petrel-config-test"]);
}

#[test]
fn validate_reports_each_rule() {
    fn check(name: &str, change: fn(&mut Config), expected: &str) {
        let mut cfg = Config::default();
        change(&mut cfg);
        let found = cfg.validate().expect_err(name);
        assert_eq!(found.len(), 1, "{name}: {found:#?}");
        assert!(found[0].contains(expected), "{name}: {found:?}");
    }
    check("qos", |c| c.mqtt.max_qos = 3, "mqtt.max_qos");
    check(
        "recv",
        |c| c.mqtt.receive_maximum = 0,
        "mqtt.receive_maximum",
    );
    check(
        "inflight",
        |c| c.mqtt.max_inflight_messages = 0,
        "mqtt.max_inflight_messages",
    );
    check(
        "small",
        |c| c.mqtt.max_packet_size_bytes = 31,
        "mqtt.max_packet_size_bytes",
    );
    check(
        "large",
        |c| c.mqtt.max_packet_size_bytes = MAX_PACKET_SIZE_BYTES + 1,
        "268435460",
    );
    check(
        "queue",
        |c| c.mqtt.max_queued_messages = 0,
        "mqtt.max_queued_messages",
    );
    check(
        "timeout",
        |c| c.mqtt.connect_timeout_ms = 0,
        "mqtt.connect_timeout_ms",
    );
    check(
        "prefix empty",
        |c| c.mqtt.client_id_prefix.clear(),
        "mqtt.client_id_prefix",
    );
    check(
        "prefix /",
        |c| c.mqtt.client_id_prefix = "a/b".into(),
        "mqtt.client_id_prefix",
    );
    check(
        "prefix long",
        |c| c.mqtt.client_id_prefix = "p".repeat(65),
        "client_id_prefix",
    );
    check(
        "levels",
        |c| c.limits.max_topic_levels = 0,
        "limits.max_topic_levels",
    );
    check(
        "conns",
        |c| c.limits.max_connections = 0,
        "limits.max_connections",
    );
    check(
        "data dir",
        |c| c.storage.data_dir = "".into(),
        "storage.data_dir",
    );
    check("log level", |c| c.log.level = "info,[[".into(), "log.level");
    check(
        "same port",
        |c| c.admin.addr = "127.0.0.1:1883".parse().expect("addr"),
        "port",
    );

    let mut edges = Config::default();
    edges.mqtt.max_packet_size_bytes = MIN_PACKET_SIZE_BYTES;
    edges.mqtt.client_id_prefix = "p".repeat(MAX_CLIENT_ID_PREFIX_LEN);
    edges.mqtt.addr = "127.0.0.1:0".parse().expect("addr");
    edges.admin.addr = "127.0.0.1:0".parse().expect("addr");
    assert_eq!(edges.validate(), Ok(()));
    edges.admin.enabled = false;
    edges.admin.addr = "0.0.0.0:1883".parse().expect("addr");
    edges.mqtt.addr = "0.0.0.0:1883".parse().expect("addr");
    assert_eq!(
        edges.validate(),
        Ok(()),
        "a disabled admin listener cannot clash"
    );

    let mut many = Config::default();
    many.mqtt.max_qos = 9;
    many.mqtt.receive_maximum = 0;
    many.limits.max_topic_levels = 0;
    assert_eq!(many.validate().map_err(|p| p.len()), Err(3));
}

#[test]
fn log_format_parses_from_flags() {
    assert_eq!("json".parse::<LogFormat>(), Ok(LogFormat::Json));
    assert_eq!("text".parse::<LogFormat>(), Ok(LogFormat::Text));
    assert!("xml".parse::<LogFormat>().is_err());
}
