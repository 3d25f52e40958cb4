//! Compiles the eBPF programs (ebpf/weft-ebpf) with the nightly toolchain so that `weft` embeds them
//! and ships as one binary.
fn main() -> anyhow::Result<()> {
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "weft-ebpf",
            root_dir: concat!(env!("CARGO_MANIFEST_DIR"), "/../ebpf/weft-ebpf"),
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
}
