//! The shipped KServe runtime fits its own settings: its memory limit
//! covers every inference slot at once with the largest allowed image, by
//! the formula the server states (`ServerConfig::memory_mib`). Before, 2
//! slots under 2 GiB were OOM-killed by two maximum-size requests.

use flawscope_server::ServerConfig;

/// The value after `flag` in the container's `args` list.
fn arg_after(manifest: &str, flag: &str) -> Option<String> {
    let mut lines = manifest.lines().map(str::trim);
    lines.by_ref().find(|l| *l == format!("- {flag}"))?;
    let value = lines.next()?.strip_prefix("- ")?;
    Some(value.trim_matches('"').to_owned())
}

/// `limits: memory:` in MiB (`Mi` or `Gi`).
fn memory_limit_mib(manifest: &str) -> Option<usize> {
    let mut lines = manifest.lines().map(str::trim);
    lines.by_ref().find(|l| *l == "limits:")?;
    let value = lines.find_map(|l| l.strip_prefix("memory:"))?.trim();
    if let Some(mi) = value.strip_suffix("Mi") {
        mi.parse().ok()
    } else {
        value
            .strip_suffix("Gi")?
            .parse::<usize>()
            .ok()
            .map(|g| g * 1024)
    }
}

#[test]
fn the_kserve_runtime_memory_limit_fits_full_concurrency_at_the_largest_image() {
    let path = crate::cli::root().join("deploy/kserve/serving-runtime.yaml");
    let manifest = std::fs::read_to_string(&path).unwrap();
    let slots: usize = arg_after(&manifest, "--max-concurrent")
        .expect("the runtime sets --max-concurrent")
        .parse()
        .unwrap();
    let body_mb: usize = arg_after(&manifest, "--body-limit-mb")
        .expect("the runtime sets --body-limit-mb")
        .parse()
        .unwrap();
    let limit = memory_limit_mib(&manifest).expect("the runtime sets a memory limit");
    let config = ServerConfig {
        body_limit: body_mb * 1024 * 1024,
        ..ServerConfig::default()
    }
    .with_slots(slots);
    let needed = config.memory_mib();
    assert!(
        limit >= needed,
        "memory limit {limit} MiB < {needed} MiB needed by {slots} slots at {body_mb} MB bodies"
    );
    // Not a blanket: within one allocation step of the formula.
    assert!(limit < needed + 256, "{limit} MiB for {needed} MiB needed");
}

// The formula's per-slot share covers the measured peak of one
// largest-allowed image (0.8 GiB above startup; see docs/serving.md).
const _: () = assert!(flawscope_server::MEMORY_PER_SLOT_MIB >= 900);
