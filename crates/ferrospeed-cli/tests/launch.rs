//! `ferrospeed launch` end to end: collectives across processes, failures, two nodes, bad input.

mod support;

use std::collections::BTreeSet;
use std::time::Duration;
use support::*;

const SIZES: &str = "0,1,2,3,4,5,7,64,1001,70001";

fn comm_check(nproc: usize) -> Finished {
    run(
        ferrospeed().args(["launch", "--nproc-per-node", &nproc.to_string(), "comm", "check", "--sizes", SIZES]),
        Duration::from_secs(120),
    )
}

fn digests(stdout: &str) -> BTreeSet<String> {
    stdout.lines().filter(|l| l.contains(" digest ")).map(str::to_string).collect()
}

#[test]
fn collectives_match_the_reference_at_world_sizes_1_to_5_and_repeat_bitwise() {
    for nproc in 1..=5 {
        let f = comm_check(nproc);
        assert!(f.status.success(), "world {nproc}: {}\n{}", f.stdout, f.stderr);
        assert!(f.stdout.contains(&format!("[rank0]: comm check: ")), "{}", f.stdout);
        assert!(f.stdout.contains(&format!("on {nproc} ranks: all passed")), "{}", f.stdout);
        assert_eq!(digests(&f.stdout).len(), nproc, "every rank reports: {}", f.stdout);
        if nproc == 3 || nproc == 5 {
            let again = comm_check(nproc);
            assert_eq!(digests(&f.stdout), digests(&again.stdout), "repeated runs must give identical bits");
        }
    }
}

/// A rank script: records its pid and a grandchild's pid, then fails as told or waits.
fn rank_script(dir: &std::path::Path, failing: &str) -> String {
    format!(
        "sleep 300 & echo \"$$ $!\" > {d}/pid.$RANK; \
         if [ \"$RANK\" = 1 ]; then while [ $(ls {d} | grep -c pid) -lt 3 ]; do sleep 0.05; done; sleep 0.3; {failing}; fi; wait",
        d = dir.display()
    )
}

fn assert_failure_is_contained(failing: &str, expect: &str) {
    let dir = tempfile::tempdir().unwrap();
    let script = rank_script(dir.path(), failing);
    let f = run(ferrospeed().args(["launch", "--nproc-per-node", "3", "sh", "-c", &script]), Duration::from_secs(30));
    assert!(!f.status.success(), "launcher must fail: {}", f.stderr);
    assert!(f.stderr.contains(&format!("rank 1 (pid")) && f.stderr.contains(expect), "{}", f.stderr);
    // Measured from the failure: the rank waits ~0.3 s after all started, the rest is the launcher.
    assert!(f.elapsed < Duration::from_secs(10), "took {:?}", f.elapsed);
    let pids = pids_in(dir.path());
    assert_eq!(pids.len(), 6, "3 ranks and their 3 children recorded");
    assert_eq!(survivors(&pids, Duration::from_secs(2)), Vec::<i32>::new(), "no process may survive");
}

#[test]
fn a_rank_that_exits_1_stops_the_job_and_is_named() {
    assert_failure_is_contained("exit 1", "exited with code 1");
}

#[test]
fn a_rank_killed_by_sigkill_stops_the_job_and_is_named() {
    assert_failure_is_contained("kill -9 $$", "killed by signal 9 (SIGKILL)");
}

#[test]
fn killing_the_launcher_takes_every_rank_with_it() {
    let dir = tempfile::tempdir().unwrap();
    let script = format!("sleep 300 & echo \"$$ $!\" > {}/pid.$RANK; wait", dir.path().display());
    let child = start(ferrospeed().args(["launch", "--nproc-per-node", "2", "sh", "-c", &script]));
    wait_for_pid_files(dir.path(), 4, Duration::from_secs(20));
    unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
    let _ = finish(child, Duration::from_secs(10));
    assert_eq!(survivors(&pids_in(dir.path()), Duration::from_secs(5)), Vec::<i32>::new(), "ranks and their children die with the launcher");
}

#[test]
fn ctrl_c_is_passed_to_the_ranks() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display();
    let script = format!("trap 'echo int > {d}/int.$RANK; exit 0' INT; echo $$ > {d}/pid.$RANK; while true; do sleep 0.05; done");
    let child = start(ferrospeed().args(["launch", "--nproc-per-node", "2", "sh", "-c", &script]));
    wait_for_pid_files(dir.path(), 2, Duration::from_secs(20));
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let f = finish(child, Duration::from_secs(20));
    assert_eq!(f.status.code(), Some(130), "{}", f.stderr);
    for rank in 0..2 {
        assert!(dir.path().join(format!("int.{rank}")).exists(), "rank {rank} did not get SIGINT: {}", f.stderr);
    }
}

#[test]
fn two_nodes_on_one_machine_form_one_world_of_four() {
    let port = free_port().to_string();
    let node = |rank: &str| {
        start(ferrospeed().args([
            "launch", "--nnodes", "2", "--node-rank", rank, "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
            "--master-port", &port, "comm", "check", "--sizes", "0,3,5,1001",
        ]))
    };
    // Node 1 first: it must wait for node 0 rather than fail.
    let n1 = node("1");
    std::thread::sleep(Duration::from_millis(300));
    let n0 = node("0");
    let (f0, f1) = (finish(n0, Duration::from_secs(60)), finish(n1, Duration::from_secs(60)));
    assert!(f0.status.success() && f1.status.success(), "node0: {}\nnode1: {}", f0.stderr, f1.stderr);
    assert!(f0.stdout.contains("on 4 ranks: all passed"), "{}", f0.stdout);
    assert!(f1.stdout.contains("[rank2]: rank 2 digest") && f1.stdout.contains("[rank3]: rank 3 digest"), "{}", f1.stdout);
}

#[test]
fn bad_input_is_one_line_exit_2_and_starts_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("started");
    let program = format!("touch {}", marker.display());
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let busy_port = busy.local_addr().unwrap().port().to_string();
    let closed_port = free_port().to_string();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["--bogus-flag"], "unexpected argument '--bogus-flag'"),
        (vec!["--nproc-per-node", "0"], "must be at least 1"),
        (vec!["--master-port", &busy_port], "pass a free --master-port"),
        (vec!["--master-port", "70000"], "70000 is not in 0..=65535"),
        (vec!["--master-port", "http"], "invalid value 'http'"),
        (vec!["--nnodes", "2", "--node-rank", "1", "--master-port", &closed_port, "--rdzv-timeout", "1"], "cannot reach node 0"),
        (vec!["--master-addr", "no-such-host.invalid"], "cannot be resolved"),
        (vec!["--nnodes", "2", "--node-rank", "2"], "--node-rank 2 is out of range"),
        (vec!["--nnodes", "2", "--master-port", "0"], "--master-port 0"),
    ];
    for (flags, expect) in cases {
        let mut args = vec!["launch"];
        args.extend(&flags);
        args.extend(["sh", "-c", &program]);
        let f = run(ferrospeed().args(&args), Duration::from_secs(30));
        assert_eq!(f.status.code(), Some(2), "{flags:?}: {}", f.stderr);
        assert_eq!(f.stderr.trim().lines().count(), 1, "{flags:?}: one line please: {}", f.stderr);
        assert!(f.stderr.contains(expect), "{flags:?}: expected {expect:?} in {}", f.stderr);
        assert!(!marker.exists(), "{flags:?}: a rank was started");
    }
    for missing in ["no-such-program-xyz", "./not/here"] {
        let f = run(ferrospeed().args(["launch", "--nproc-per-node", "2", missing]), Duration::from_secs(30));
        assert_eq!(f.status.code(), Some(2), "{}", f.stderr);
        assert_eq!(f.stderr.trim().lines().count(), 1, "{}", f.stderr);
        assert!(f.stderr.contains("not found"), "{}", f.stderr);
    }
    drop(busy);
}
