//! petrel-bench: the MQTT load generator (issue 4 fills in the scenarios).

fn main() -> anyhow::Result<()> {
    anyhow::bail!("petrel-bench has no scenarios yet; see the README's roadmap")
}
