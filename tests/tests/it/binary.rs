//! Issue 2, point 11: the `petrel` binary (flags, environment, TOML, signals, logs).

use petrel_tests::run_petrel;

use crate::*;

fn stdout(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn all_output(o: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[tokio::test]
async fn print_default_config_is_documented_toml_with_the_defaults() {
    test_timeout(async {
        let out = run_petrel(&["--print-default-config"], &[], WAIT).await;
        assert!(
            out.status.success(),
            "exit {:?}: {}",
            out.status,
            all_output(&out)
        );
        let text = stdout(&out);
        let v: toml::Table =
            toml::from_str(&text).unwrap_or_else(|e| panic!("not TOML: {e}\n{text}"));
        let get = |section: &str, key: &str| -> toml::Value {
            v.get(section)
                .and_then(|s| s.get(key))
                .cloned()
                .unwrap_or_else(|| panic!("missing {section}.{key} in\n{text}"))
        };
        let s = |x: &str| toml::Value::String(x.into());
        let i = |x: i64| toml::Value::Integer(x);
        assert_eq!(get("mqtt", "addr"), s("0.0.0.0:1883"));
        assert_eq!(get("mqtt", "connect_timeout_ms"), i(10_000));
        assert_eq!(get("mqtt", "max_packet_size_bytes"), i(1_048_576));
        assert_eq!(get("mqtt", "max_keep_alive_secs"), i(0));
        assert_eq!(get("mqtt", "receive_maximum"), i(128));
        assert_eq!(get("mqtt", "max_inflight_messages"), i(128));
        assert_eq!(get("mqtt", "max_queued_messages"), i(1000));
        assert_eq!(get("mqtt", "queue_overflow"), s("drop-newest"));
        assert_eq!(
            get("mqtt", "queue_qos0_offline"),
            toml::Value::Boolean(false)
        );
        assert_eq!(get("mqtt", "topic_alias_maximum"), i(64));
        assert_eq!(get("mqtt", "max_qos"), i(2));
        assert_eq!(get("mqtt", "retain_available"), toml::Value::Boolean(true));
        // Bounded by default (issue 10): 7 days, 16 MiB queued per session.
        assert_eq!(get("mqtt", "session_expiry_max_secs"), i(604_800));
        assert_eq!(get("mqtt", "persistent_session_expiry_secs"), i(604_800));
        assert_eq!(get("mqtt", "max_queued_bytes"), i(16_777_216));
        assert_eq!(get("mqtt", "sys_interval_secs"), i(10));
        assert_eq!(get("mqtt", "client_id_prefix"), s("petrel-"));
        assert_eq!(get("admin", "enabled"), toml::Value::Boolean(true));
        assert_eq!(get("admin", "addr"), s("0.0.0.0:8080"));
        assert_eq!(get("storage", "data_dir"), s("./data"));
        assert_eq!(get("limits", "max_connections"), i(100_000));
        assert_eq!(get("limits", "max_topic_levels"), i(128));
        assert_eq!(get("limits", "max_subscriptions_per_client"), i(10_000));
        assert_eq!(get("limits", "max_retained_messages"), i(1_000_000));
        assert_eq!(get("limits", "max_retained_bytes"), i(536_870_912));
        assert_eq!(get("log", "format"), s("text"));
        assert_eq!(get("log", "level"), s("info,openraft=warn"));
        assert_eq!(get("cluster", "grpc_addr"), s("0.0.0.0:7883"));
        assert_eq!(get("cluster", "voters"), i(3));
        assert_eq!(get("cluster", "propose_timeout_ms"), i(5000));

        eprintln!("--- every setting is documented by a comment");
        let mut after_comment = false;
        for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
            let is_setting = !line.starts_with('#') && !line.starts_with('[') && line.contains('=');
            if is_setting {
                assert!(
                    after_comment || line.contains('#'),
                    "setting without a comment: {line:?}"
                );
            }
            after_comment = line.starts_with('#');
        }

        eprintln!("--- the printed file is accepted as --config");
        let b = Broker::builder().config_toml(&text).start().await;
        V3Client::connect(b.mqtt_addr(), "printed-config").await;
    })
    .await
}

async fn assert_exit_64(args: &[&str], env: &[(&str, &str)], mentions: &str) {
    let dir = tempfile::tempdir().expect("temp dir");
    let ready = dir.path().join("ready.json");
    let ready_s = ready.to_string_lossy().into_owned();
    let dir_s = dir.path().to_string_lossy().into_owned();
    let mut all: Vec<&str> = vec![
        "--mqtt-addr",
        "127.0.0.1:0",
        "--admin-addr",
        "127.0.0.1:0",
        "--data-dir",
        &dir_s,
        "--ready-file",
        &ready_s,
    ];
    all.extend_from_slice(args);
    let out = run_petrel(&all, env, WAIT).await;
    let text = all_output(&out);
    assert_eq!(
        out.status.code(),
        Some(64),
        "bad config exit code; output:\n{text}"
    );
    assert!(
        text.contains(mentions),
        "output names {mentions:?}:\n{text}"
    );
    assert!(
        !ready.exists(),
        "no ready file: the broker must fail before binding"
    );
}

#[tokio::test]
async fn bad_config_exits_64_before_binding() {
    test_timeout(async {
        let dir = tempfile::tempdir().expect("temp dir");
        let unknown_key = dir.path().join("unknown-key.toml");
        std::fs::write(&unknown_key, "[mqtt]\nno_such_key = 1\n").expect("write");
        let unknown_section = dir.path().join("unknown-section.toml");
        std::fs::write(&unknown_section, "[nonsense]\nx = 1\n").expect("write");
        let bad_value = dir.path().join("bad-value.toml");
        std::fs::write(&bad_value, "[mqtt]\nmax_qos = 3\n").expect("write");
        let not_toml = dir.path().join("not.toml");
        std::fs::write(&not_toml, "this is = = not toml\n").expect("write");

        eprintln!("--- unknown TOML key");
        assert_exit_64(
            &["--config", &unknown_key.to_string_lossy()],
            &[],
            "no_such_key",
        )
        .await;
        eprintln!("--- unknown TOML section");
        assert_exit_64(
            &["--config", &unknown_section.to_string_lossy()],
            &[],
            "nonsense",
        )
        .await;
        eprintln!("--- invalid value in TOML");
        assert_exit_64(&["--config", &bad_value.to_string_lossy()], &[], "max_qos").await;
        eprintln!("--- unparsable TOML");
        assert_exit_64(&["--config", &not_toml.to_string_lossy()], &[], "not.toml").await;
        eprintln!("--- unknown PETREL_X__Y variable");
        assert_exit_64(&[], &[("PETREL_MQTT__NO_SUCH_KEY", "1")], "NO_SUCH_KEY").await;
        eprintln!("--- invalid value from the environment");
        assert_exit_64(&[], &[("PETREL_MQTT__MAX_QOS", "3")], "max_qos").await;
    })
    .await
}

#[tokio::test]
async fn sigterm_disconnects_v5_clients_with_0x8b_and_exits_0() {
    test_timeout(async {
        let mut b = Broker::start().await;
        let mut c5 = V5Client::connect(b.mqtt_addr(), "term5").await;
        let mut c3 = V3Client::connect(b.mqtt_addr(), "term3").await;
        b.sigterm();
        let (code, _) = c5.wait_disconnect(WAIT).await;
        assert_eq!(code, p5::DisconnectReasonCode::ServerShuttingDown);
        c3.wait_closed(WAIT).await;
        let status = b.wait_exit(WAIT).await;
        assert_eq!(status.code(), Some(0), "graceful shutdown exit status");
    })
    .await
}

#[tokio::test]
async fn sigint_exits_0() {
    test_timeout(async {
        let mut b = Broker::start().await;
        let mut c5 = V5Client::connect(b.mqtt_addr(), "int5").await;
        b.sigint();
        let (code, _) = c5.wait_disconnect(WAIT).await;
        assert_eq!(code, p5::DisconnectReasonCode::ServerShuttingDown);
        assert_eq!(b.wait_exit(WAIT).await.code(), Some(0));
    })
    .await
}

#[tokio::test]
async fn ready_file_log_line_and_health() {
    test_timeout(async {
        let b = Broker::start().await;
        let r = b.ready_info().clone();
        assert_eq!(r.pid, u64::from(b.pid()), "ready file pid");
        assert!(r.mqtt.ip().is_loopback() && r.mqtt.port() != 0);
        let admin = r.admin.expect("admin address in the ready file");
        assert!(admin.port() != 0);
        let port = r.mqtt.port().to_string();
        wait_until("the bound address is logged", WAIT, || async {
            let log = b.log();
            if log
                .lines()
                .any(|l| l.contains("listening") && l.contains(&port))
            {
                Ok(())
            } else {
                Err(log)
            }
        })
        .await;
        assert_eq!(b.http_get("/health/live").await.0, 200);
        assert_eq!(b.http_get("/healthz").await, (200, "ok\n".to_owned()));
        // Ready once the node leads its cluster of one (an election of a few ms after the
        // listeners are up, which the ready file reports).
        b.wait_ready(200).await;
        assert_eq!(b.http_get("/readyz").await, (200, "ready\n".to_owned()));
        let m = b.metrics().await;
        for family in [
            "petrel_mqtt_connections",
            "petrel_sessions",
            "petrel_retained_messages",
        ] {
            assert!(m.has_family(family), "{family} exported:\n{}", m.0);
        }
    })
    .await
}

#[tokio::test]
async fn admin_can_be_disabled() {
    test_timeout(async {
        let b = Broker::builder()
            .without_admin_addr_flag()
            .env("PETREL_ADMIN__ENABLED", "false")
            .start()
            .await;
        assert_eq!(b.ready_info().admin, None, "admin null in the ready file");
        V3Client::connect(b.mqtt_addr(), "noadmin").await;
    })
    .await
}

#[tokio::test]
async fn address_and_data_dir_from_environment() {
    test_timeout(async {
        let data = tempfile::tempdir().expect("temp dir");
        let b = Broker::builder()
            .without_mqtt_addr_flag()
            .without_data_dir_flag()
            .env("PETREL_MQTT_ADDR", "127.0.0.1:0")
            .env("PETREL_DATA_DIR", &data.path().to_string_lossy())
            .start()
            .await;
        assert!(b.mqtt_addr().ip().is_loopback());
        V3Client::connect(b.mqtt_addr(), "env-addr").await;

        eprintln!("--- the database is under PETREL_DATA_DIR, not under the default ./data");
        let db = data.path().join("db");
        for file in ["CURRENT", "LOCK"] {
            assert!(
                db.join(file).is_file(),
                "no RocksDB {file} in {} (PETREL_DATA_DIR); it holds {:?}",
                db.display(),
                std::fs::read_dir(data.path())
                    .map(|d| d
                        .filter_map(Result::ok)
                        .map(|e| e.file_name())
                        .collect::<Vec<_>>())
                    .unwrap_or_default()
            );
        }
        let default_dir = b.dir().join("data"); // ./data of the broker's working directory
        assert!(
            !default_dir.exists(),
            "the node also wrote the default {}",
            default_dir.display()
        );
    })
    .await
}

/// An address no local interface has: binding it fails.
const UNBINDABLE: &str = "192.0.2.1:1883";

#[tokio::test]
async fn precedence_defaults_toml_env_flags() {
    test_timeout(async {
        eprintln!("--- TOML is read: an unbindable address from TOML fails the start");
        let toml_addr = format!("[mqtt]\naddr = \"{UNBINDABLE}\"\n");
        let mut s = Broker::builder()
            .without_mqtt_addr_flag()
            .config_toml(&toml_addr)
            .spawn();
        let status = s.wait_exit(WAIT).await;
        assert!(
            !status.success(),
            "bind to {UNBINDABLE} must fail: {status}"
        );

        eprintln!("--- env beats TOML");
        let b = Broker::builder()
            .without_mqtt_addr_flag()
            .config_toml(&toml_addr)
            .env("PETREL_MQTT_ADDR", "127.0.0.1:0")
            .start()
            .await;
        assert!(b.mqtt_addr().ip().is_loopback());
        drop(b);

        eprintln!("--- flag beats env");
        let b = Broker::builder()
            .env("PETREL_MQTT_ADDR", UNBINDABLE)
            .start()
            .await;
        assert!(b.mqtt_addr().ip().is_loopback());
        drop(b);

        eprintln!("--- generic PETREL_SECTION__FIELD beats TOML");
        let toml_alias = "[mqtt]\ntopic_alias_maximum = 5\n";
        let b = Broker::builder().config_toml(toml_alias).start().await;
        let c = V5Client::connect(b.mqtt_addr(), "prec-toml").await;
        assert_eq!(c.connack_props().topic_alias_max, Some(5), "from TOML");
        drop(b);
        let b = Broker::builder()
            .config_toml(toml_alias)
            .env("PETREL_MQTT__TOPIC_ALIAS_MAXIMUM", "7")
            .start()
            .await;
        let c = V5Client::connect(b.mqtt_addr(), "prec-env").await;
        assert_eq!(c.connack_props().topic_alias_max, Some(7), "env over TOML");

        eprintln!("--- PETREL_CONFIG names the file");
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("via-env.toml");
        std::fs::write(&path, toml_alias).expect("write");
        let b = Broker::builder()
            .env("PETREL_CONFIG", &path.to_string_lossy())
            .start()
            .await;
        let c = V5Client::connect(b.mqtt_addr(), "prec-config-env").await;
        assert_eq!(c.connack_props().topic_alias_max, Some(5));
    })
    .await
}

#[tokio::test]
async fn json_log_format() {
    test_timeout(async {
        let b = Broker::start_with(&[], &["--log-format", "json"]).await;
        let _c = V3Client::connect(b.mqtt_addr(), "json-logs").await;
        let port = b.mqtt_addr().port().to_string();
        let log = wait_until("the listening line is logged", WAIT, || async {
            let log = b.log();
            if log.contains("listening") && log.contains(&port) {
                Ok(log)
            } else {
                Err(log)
            }
        })
        .await;
        for line in log.lines().filter(|l| !l.trim().is_empty()) {
            let v: Result<serde_json::Value, _> = serde_json::from_str(line);
            assert!(v.is_ok(), "log line is not JSON: {line:?}");
        }
    })
    .await
}
