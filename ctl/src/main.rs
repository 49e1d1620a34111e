//! `trellis`: the Trellis CLI and controller.

fn main() {
    trellis_ctl::cli::main()
}
