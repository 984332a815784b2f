//! `inferlab gpu check|bench` on a machine without CUDA must fail cleanly:
//! non-zero exit, a message that names the cause, no panic. (CI has no GPU;
//! on a GPU machine this test has nothing to say and returns early.)

use std::process::Command;

fn no_driver() -> bool {
    !inferlab_gpu::driver_present()
}

#[test]
fn gpu_commands_say_no_device() {
    if !no_driver() {
        eprintln!("SKIP gpu_commands_say_no_device: a CUDA driver is present");
        return;
    }
    for sub in [&["gpu", "check"][..], &["gpu", "bench"][..]] {
        let out = Command::new(env!("CARGO_BIN_EXE_inferlab"))
            .args(sub)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{sub:?} succeeded without a GPU");
        assert!(
            err.contains("no CUDA device/driver found"),
            "{sub:?}: {err}"
        );
        assert!(!err.contains("panicked"), "{sub:?} panicked: {err}");
    }
}
