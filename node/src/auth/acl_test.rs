use super::*;

use SubscribeDecision::{Allow, AllowFiltered, Deny};

fn user<'a>(name: &'a str, client_id: &'a str) -> ClientCtx<'a> {
    ClientCtx {
        username: Some(name),
        client_id,
    }
}

fn anon(client_id: &str) -> ClientCtx<'_> {
    ClientCtx {
        username: None,
        client_id,
    }
}

fn acl(text: &str) -> Acl {
    Acl::parse(text).unwrap_or_else(|e| panic!("parse {text:?}: {e}"))
}

const EXAMPLE: &str = "
# first matching rule wins
[client sensor-7]        # by client id
allow publish sensors/%c/#

[user alice]             # by username
deny subscribe chat/admin/#
allow all chat/#

[anonymous]
allow subscribe public/#

[all]
allow subscribe $SYS/#
allow all users/%u/#
";

#[test]
fn parse_errors_name_the_line() {
    let table = [
        ("allow publish a", 1, "rule before the first block header"),
        (
            "[all]\nallow publish a/#/b",
            2,
            "invalid topic filter \"a/#/b\"",
        ),
        (
            "[all]\n\n# c\npermit publish a",
            4,
            "expected allow or deny",
        ),
        ("[all]\nallow read a", 2, "unknown action \"read\""),
        ("[all]\nallow", 2, "missing action"),
        ("[all]\nallow publish", 2, "missing topic filter"),
        ("[all]\nallow publish   ", 2, "missing topic filter"),
        ("[all]\nallow publish a/b+", 2, "'+' must be alone"),
        ("[client]", 1, "needs a name"),
        ("[user   ]", 1, "needs a name"),
        ("[all x]", 1, "takes no name"),
        ("[anonymous x]", 1, "takes no name"),
        ("[group x]", 1, "unknown block \"group\""),
        ("[all", 1, "lacks ']'"),
        ("[all] allow publish a", 1, "unexpected text"),
    ];
    for (text, line, reason) in table {
        let err = Acl::parse(text).expect_err(text).to_string();
        assert!(
            err.starts_with(&format!("parse acl file line {line}: ")),
            "{text:?}: {err}"
        );
        assert!(err.contains(reason), "{text:?}: {err}");
    }
}

#[test]
fn parse_accepts_layout_variants() {
    let acl = acl("  [all]   # comment\n\tallow   publish\ta b/c \r\n[client  x y ]\ndeny all #\n");
    assert!(
        acl.check_publish(&anon("c"), "a b/c"),
        "filter is the rest of the line, inner space kept"
    );
    assert!(
        !acl.check_publish(&anon("x y"), "a b/c"),
        "client name trimmed, inner space kept"
    );
    assert!(Acl::parse("").is_ok());
}

#[test]
fn no_match_denies() {
    let acl = acl("");
    assert!(!acl.check_publish(&anon("c"), "a"));
    assert!(!acl.check_receive(&anon("c"), "a"));
    assert_eq!(acl.check_subscribe(&anon("c"), "#"), Deny);
}

#[test]
fn publish_table() {
    let acl = acl(EXAMPLE);
    let alice = user("alice", "a1");
    let bob = user("bob", "b1");
    let sensor = anon("sensor-7");
    let table = [
        (sensor, "sensors/sensor-7/temp", true),
        (sensor, "sensors/sensor-7", true),
        (sensor, "sensors/sensor-8/temp", false),
        (sensor, "public/x", false),
        (alice, "chat/general", true),
        (alice, "chat/admin/x", true),
        (alice, "users/alice/inbox", true),
        (alice, "users/bob/inbox", false),
        (bob, "chat/general", false),
        (bob, "users/bob", true),
        (anon("x"), "users/x", false),
        (alice, "$SYS/broker/version", false),
    ];
    for (ctx, topic, want) in table {
        assert_eq!(
            acl.check_publish(&ctx, topic),
            want,
            "{ctx:?} publish {topic}"
        );
    }
}

#[test]
fn receive_and_subscribe_table() {
    let acl = acl(EXAMPLE);
    let alice = user("alice", "a1");
    let anonymous = anon("x");
    let table = [
        (alice, "chat/general", Allow),
        (alice, "chat/general/x", Allow),
        (alice, "chat/+", AllowFiltered), // chat/admin itself is denied
        (alice, "chat/#", AllowFiltered),
        (alice, "chat/admin/#", Deny),
        (alice, "chat/admin/x", Deny),
        (alice, "chat/+/x", AllowFiltered),
        (alice, "#", AllowFiltered),
        (alice, "$SYS/#", Allow),
        (alice, "users/alice/#", Allow),
        (alice, "users/+/#", AllowFiltered),
        (alice, "public/#", Deny),
        (anonymous, "public/#", Allow),
        (anonymous, "$SYS/broker/+", Allow),
        (anonymous, "chat/x", Deny),
    ];
    for (ctx, filter, want) in table {
        assert_eq!(
            acl.check_subscribe(&ctx, filter),
            want,
            "{ctx:?} subscribe {filter}"
        );
    }
    assert!(acl.check_receive(&alice, "chat/x"));
    assert!(!acl.check_receive(&alice, "chat/admin/x"));
    assert!(
        !acl.check_receive(&alice, "chat/admin"),
        "'#' matches the parent level"
    );
    assert!(acl.check_receive(&alice, "$SYS/broker/uptime"));
    assert!(!acl.check_receive(&anonymous, "chat/x"));
}

#[test]
fn subscribe_decisions_with_shadowed_rules() {
    let table = [
        // A deny that an earlier allow already decides is dead.
        (
            "allow subscribe a/b/#\ndeny subscribe a/b/c\nallow subscribe a/#",
            "a/#",
            Allow,
        ),
        // An allow that an earlier deny already decides is dead.
        (
            "deny subscribe a/b/#\nallow subscribe a/b/c\ndeny subscribe a/#",
            "a/#",
            Deny,
        ),
        ("deny subscribe a/b/#\nallow subscribe a/b/c", "a/#", Deny),
        (
            "allow subscribe a/b\nallow subscribe a/c",
            "a/+",
            AllowFiltered,
        ),
        ("allow subscribe a/+\ndeny subscribe a/b", "a/+", Allow),
        (
            "deny subscribe a/b\nallow subscribe a/+",
            "a/+",
            AllowFiltered,
        ),
        ("deny subscribe a/b\nallow subscribe a/+", "a/c", Allow),
        ("allow subscribe a/+", "a/#", AllowFiltered),
        ("allow subscribe #", "$SYS/#", Deny),
        ("allow subscribe #", "+/#", Allow),
        ("allow publish #", "a", Deny),
        ("deny all a/#\nallow all #", "a/b", Deny),
        ("deny all a/#\nallow all #", "#", AllowFiltered),
    ];
    for (rules, filter, want) in table {
        let acl = acl(&format!("[all]\n{rules}"));
        assert_eq!(
            acl.check_subscribe(&anon("c"), filter),
            want,
            "{rules:?} / {filter}"
        );
    }
}

#[test]
fn evaluation_order_is_client_user_anonymous_all() {
    let acl = acl("[all]\nallow publish t/all\ndeny publish t/#\n\
         [anonymous]\nallow publish t/anon\ndeny publish t/all\n\
         [user u]\nallow publish t/user\ndeny publish t/anon\n\
         [client c]\nallow publish t/client\ndeny publish t/user\n\
         [client c]\ndeny publish t/client\nallow publish t/second-block\n");
    let table = [
        (user("u", "c"), "t/client", true),
        (user("u", "c"), "t/second-block", true),
        (user("u", "c"), "t/user", false),
        (user("u", "d"), "t/user", true),
        (user("u", "d"), "t/anon", false),
        (anon("d"), "t/anon", true),
        (anon("d"), "t/all", false),
        (user("v", "d"), "t/anon", false),
        (user("v", "d"), "t/all", true),
        (user("v", "d"), "t/other", false),
    ];
    for (ctx, topic, want) in table {
        assert_eq!(
            acl.check_publish(&ctx, topic),
            want,
            "{ctx:?} publish {topic}"
        );
    }
}

#[test]
fn substitutions() {
    let acl = acl(
        "[all]\nallow all users/%u/#\nallow publish devices/%c/%u/status\nallow all x-%c-y/z\n",
    );
    let table = [
        (user("alice", "c1"), "users/alice/a", true),
        (user("alice", "c1"), "devices/c1/alice/status", true),
        (user("alice", "c1"), "devices/c1/bob/status", false),
        (user("alice", "c1"), "x-c1-y/z", true),
        (anon("c1"), "users/c1", false),
        (anon("c1"), "devices/c1//status", false),
    ];
    for (ctx, topic, want) in table {
        assert_eq!(
            acl.check_publish(&ctx, topic),
            want,
            "{ctx:?} publish {topic}"
        );
    }
    let literal = Acl::parse("[all]\nallow publish 100%/%x/%").expect("parse");
    assert!(
        literal.check_publish(&anon("c"), "100%/%x/%"),
        "other % sequences are literal"
    );
}

#[test]
fn unsafe_values_never_widen_allow_rules() {
    let acl = acl("[all]\nallow all users/%u/#\nallow all %c/#\n");
    for name in ["+", "#", "a/b", "", "$SYS", "a+b"] {
        let ctx = user(name, "client");
        assert!(!acl.check_publish(&ctx, "users/a/b"), "{name:?}");
        assert!(
            !acl.check_publish(&ctx, &format!("users/{name}")),
            "{name:?}"
        );
        assert_eq!(acl.check_subscribe(&ctx, "users/#"), Deny, "{name:?}");
    }
    for id in ["+", "#", "$SYS", "a/b"] {
        let ctx = anon(id);
        assert!(!acl.check_receive(&ctx, "$SYS/broker/version"), "{id:?}");
        assert!(!acl.check_receive(&ctx, "a/b/c"), "{id:?}");
        assert_eq!(acl.check_subscribe(&ctx, "$SYS/#"), Deny, "{id:?}");
    }
}

#[test]
fn unsafe_values_make_deny_rules_cover_the_subtree() {
    let acl = acl(
        "[all]\ndeny all private/%u/#\ndeny publish %c/secret\nallow all #\nallow all $SYS/#\n",
    );
    let plus = user("+", "c");
    assert!(!acl.check_publish(&plus, "private/bob/x"));
    assert!(!acl.check_publish(&plus, "private"));
    assert!(acl.check_publish(&plus, "public/x"));
    assert_eq!(acl.check_subscribe(&plus, "private/#"), Deny);
    let anonymous = anon("c");
    assert!(
        !acl.check_publish(&anonymous, "private/x"),
        "no username: deny covers the subtree"
    );
    assert!(acl.check_publish(&anonymous, "c/public"));
    assert!(!acl.check_publish(&anonymous, "c/secret"));
    let dollar = user("u", "$SYS");
    assert!(
        !acl.check_publish(&dollar, "$SYS/secret"),
        "first-level fallback covers $ topics too"
    );
    assert!(!acl.check_publish(&dollar, "anything"));
    assert!(
        acl.check_receive(&dollar, "anything"),
        "the publish-only deny does not affect receiving"
    );
}

#[test]
fn load_names_the_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("acl");
    std::fs::write(&path, "[all]\nallow nothing x\n").expect("write");
    let err = Acl::load(&path).expect_err("bad action").to_string();
    assert!(
        err.starts_with(&format!("parse acl file {} line 2: ", path.display())),
        "{err}"
    );
    std::fs::write(&path, EXAMPLE).expect("write");
    assert!(Acl::load(&path)
        .expect("load")
        .check_publish(&user("bob", "b"), "users/bob"));
}
