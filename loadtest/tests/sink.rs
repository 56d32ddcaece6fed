//! The generator against its own discard server: no broker needed.

use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use petrel_loadtest::run_args;
use petrel_loadtest::sink::Sink;
use tokio_util::sync::CancellationToken;

#[tokio::test]
async fn pub_against_the_sink_gets_every_qos_acknowledged() {
    let sink = Sink::bind("127.0.0.1:0").await.expect("bind");
    let addr = sink.local_addr().expect("addr").to_string();
    let counters = sink.counters();
    let stop = CancellationToken::new();
    let server = tokio::spawn(sink.serve(stop.clone()));
    let mut total = 0;
    for (version, qos) in [("3", "0"), ("5", "1"), ("3", "2"), ("5", "0,1,2")] {
        let args = [
            "pub",
            "--broker",
            &addr,
            "--mqtt-version",
            version,
            "--qos",
            qos,
            "-c",
            "3",
            "--count",
            "1000",
            "--quiet",
        ];
        let run = tokio::time::timeout(Duration::from_secs(60), run_args(args))
            .await
            .expect("in time");
        let r = run.unwrap_or_else(|e| panic!("pub {args:?}: {e:#}"));
        assert!(r.errors.is_empty(), "{:?}", r.errors);
        assert_eq!(r.sent, 3000);
        let acked: u64 = r
            .publisher_results
            .iter()
            .filter(|p| p.qos > 0)
            .map(|p| p.sent)
            .sum();
        assert_eq!(
            r.acked, acked,
            "every QoS 1/2 message handshaken, qos {qos}"
        );
        total += 3000;
    }
    // The publishers' DISCONNECTs were answered by closes, so the sink has read everything.
    assert_eq!(counters.publishes.load(Relaxed), total);
    assert_eq!(counters.connections.load(Relaxed), 12);
    stop.cancel();
    server.await.expect("sink task");
}
