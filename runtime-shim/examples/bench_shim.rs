//! Benchmark driver of `scripts/bench-shim`: create + start + wait + delete of `/bin/true`
//! from one rootfs, N runs each for hako-shim (through the client library, as the agent
//! drives it), `crun run` and `runc run` over the same rootfs; prints medians, p95 and ratios.
//! Runs everything in a private mount namespace with `/sys/fs/cgroup/unified` unmounted so
//! that crun 1.8 accepts a hybrid host (hako-shim handles either layout).
#![allow(unsafe_code)]

use hako_shim::client::Runtime;
use hako_shim::spec::{CgroupSpec, ContainerSpec, Process, Rootfs};
use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn stats(mut v: Vec<Duration>) -> (f64, f64, f64) {
    v.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let median = ms(v[v.len() / 2]);
    let p95 = ms(v[((v.len() * 95).div_ceil(100))
        .saturating_sub(1)
        .min(v.len() - 1)]);
    let mean = v.iter().map(|d| ms(*d)).sum::<f64>() / v.len() as f64;
    (median, p95, mean)
}

fn private_mount_ns() {
    use nix::mount::{mount, umount2, MntFlags, MsFlags};
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS).expect("unshare mnt");
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .expect("make / rprivate");
    if std::path::Path::new("/sys/fs/cgroup/unified/cgroup.controllers").exists() {
        umount2("/sys/fs/cgroup/unified", MntFlags::MNT_DETACH).expect("umount unified");
    }
}

fn main() {
    let shim = PathBuf::from(arg("--shim").expect("--shim BIN"));
    let rootfs = PathBuf::from(arg("--rootfs").expect("--rootfs DIR"));
    let bundle = PathBuf::from(arg("--bundle").expect("--bundle DIR (config.json for crun/runc)"));
    let work = PathBuf::from(arg("--work").expect("--work DIR"));
    let runs: usize = arg("--runs").and_then(|r| r.parse().ok()).unwrap_or(50);
    private_mount_ns();

    let rt = Runtime::new(&shim, work.join("hako-state"));
    let phases: std::cell::RefCell<Vec<[Duration; 4]>> = std::cell::RefCell::new(Vec::new());
    let hako = |i: usize| {
        let id = format!("bench-{i}");
        let spec = ContainerSpec {
            id: id.clone(),
            rootfs: Rootfs::Dir(rootfs.clone()),
            readonly_rootfs: true,
            process: Process {
                args: vec!["/bin/true".into()],
                ..Default::default()
            },
            cgroup: Some(CgroupSpec {
                path: format!("hako-bench/{id}"),
                ..Default::default()
            }),
            ..Default::default()
        };
        let t = Instant::now();
        let c = rt.create(&spec).expect("hako create");
        let t1 = t.elapsed();
        c.start().expect("hako start");
        let t2 = t.elapsed();
        let st = c.wait(None).expect("hako wait");
        let t3 = t.elapsed();
        c.delete().expect("hako delete");
        let d = t.elapsed();
        phases.borrow_mut().push([t1, t2 - t1, t3 - t2, d - t3]);
        assert_eq!(st.exit_code, Some(0), "hako: /bin/true failed");
        d
    };
    let oci = |bin: &'static str| {
        let bundle = bundle.clone();
        move |i: usize| {
            let id = format!("bench-{bin}-{i}");
            let t = Instant::now();
            let st = Command::new(bin)
                .args(["run", "--bundle"])
                .arg(&bundle)
                .arg(&id)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .status()
                .expect("run");
            let d = t.elapsed();
            assert!(st.success(), "{bin} run failed");
            d
        }
    };
    // Round-robin, so that load from elsewhere on the machine hits every runtime alike.
    let crun = oci("crun");
    let runc = oci("runc");
    let runtimes: [(&str, &dyn Fn(usize) -> Duration); 3] =
        [("hako-shim", &hako), ("crun", &crun), ("runc", &runc)];
    for (_, f) in &runtimes {
        for i in 0..3 {
            f(1_000_000 + i);
        }
    }
    let mut results: Vec<(&str, Vec<Duration>)> =
        runtimes.iter().map(|(n, _)| (*n, Vec::new())).collect();
    for i in 0..runs {
        for (k, (_, f)) in runtimes.iter().enumerate() {
            results[k].1.push(f(i));
        }
    }
    let _ = std::fs::remove_dir(work.join("hako-state"));
    for c in ["cpu", "cpuacct", "memory", "pids"] {
        let _ = std::fs::remove_dir(format!("/sys/fs/cgroup/{c}/hako-bench"));
    }

    let crun_median = results
        .iter()
        .find(|(n, _)| *n == "crun")
        .map(|(_, v)| stats(v.clone()).0)
        .unwrap_or(f64::NAN);
    let mut out = std::io::stdout().lock();
    let _ = writeln!(
        out,
        "create+start+wait+delete of /bin/true, {runs} runs each (interleaved)\n{:<10} {:>10} {:>10} {:>10} {:>14}",
        "runtime", "median ms", "p95 ms", "mean ms", "median/crun"
    );
    let ph = phases.borrow();
    let phase = |k: usize| stats(ph.iter().map(|p| p[k]).collect()).0;
    let _ = writeln!(
        out,
        "hako-shim phases (median ms): create {:.2}, start {:.2}, wait {:.2}, delete {:.2}",
        phase(0),
        phase(1),
        phase(2),
        phase(3)
    );
    for (name, v) in &results {
        let (m, p, mean) = stats(v.clone());
        let _ = writeln!(
            out,
            "{name:<10} {m:>10.2} {p:>10.2} {mean:>10.2} {:>14.2}",
            m / crun_median
        );
    }
}
