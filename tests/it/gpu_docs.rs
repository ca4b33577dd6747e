//! docs/gpu.md stays true: its XID table is the one `src/gpu/xid.rs` renders,
//! and every GPU metric family the golden expositions contain is documented.
//! `GPUOPS_BLESS=1 cargo test --test it gpu_docs::` rewrites the table.

use std::path::PathBuf;

const START: &str = "<!-- xid-catalogue:start -->\n";
const END: &str = "<!-- xid-catalogue:end -->";

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn xid_table_matches_the_catalogue() {
    let path = root().join("docs/gpu.md");
    let doc = std::fs::read_to_string(&path).unwrap();
    let (head, rest) = doc.split_once(START).expect("start marker");
    let (table, tail) = rest.split_once(END).expect("end marker");
    let want = gpuops::gpu::xid::catalogue_markdown();
    if std::env::var_os("GPUOPS_BLESS").is_some() {
        std::fs::write(&path, format!("{head}{START}{want}{END}{tail}")).unwrap();
        return;
    }
    assert_eq!(
        table, want,
        "docs/gpu.md's XID table is stale: run GPUOPS_BLESS=1 cargo test --test it gpu_docs::"
    );
}

#[test]
fn every_exported_gpu_family_is_documented() {
    let doc = std::fs::read_to_string(root().join("docs/gpu.md")).unwrap();
    for golden in ["gpu-h100x8.prom", "gpu-mig.prom", "gpu-h100x8-dcgm.prom"] {
        let text = std::fs::read_to_string(root().join("tests/golden").join(golden)).unwrap();
        for name in text.lines().filter_map(|l| l.strip_prefix("# TYPE ")) {
            let name = name.split_whitespace().next().unwrap();
            if name.starts_with("gpuops_collector") || name.starts_with("gpuops_build") {
                continue;
            }
            assert!(
                doc.contains(&format!("`{name}`")) || doc.contains(&format!("`{name},")),
                "{name} (in {golden}) is not documented in docs/gpu.md"
            );
        }
    }
}
