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

/// A file holding `token`, readable by its owner only (what `--rdzv-token-file` wants).
fn token_file(dir: &std::path::Path, name: &str, token: &str) -> std::path::PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join(name);
    std::fs::write(&path, format!("{token}\n")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    path
}

#[test]
fn two_nodes_on_one_machine_form_one_world_of_four() {
    // The test binds the store's port and hands the socket to node 0: nothing can take it in between.
    let store = listener();
    let port = store.local_addr().unwrap().port().to_string();
    let node = |rank: &str| {
        let mut cmd = ferrospeed();
        // The secret every node shares, as a user would export it.
        cmd.env("FERROSPEED_RDZV_TOKEN", "d1c3a0e6b9f24c7e8a5b0f1e2d3c4b5a");
        cmd.args([
            "launch", "--nnodes", "2", "--node-rank", rank, "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
            "--master-port", &port, "comm", "check", "--sizes", "0,3,5,1001",
        ]);
        if rank == "0" {
            hand_over(&mut cmd, &store);
        }
        start(&mut cmd)
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
fn ranks_started_by_srun_or_mpirun_form_a_group_with_rank_0_serving_the_store() {
    // No launcher: each process reads Slurm's or Open MPI's variables, and rank 0 serves the store.
    let vars = |source: &str, rank: usize| -> Vec<(String, String)> {
        let v = |pairs: &[(&str, &str)]| pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let r = rank.to_string();
        match source {
            "slurm" => v(&[("SLURM_PROCID", &r), ("SLURM_NTASKS", "3"), ("SLURM_LOCALID", &r), ("SLURM_NTASKS_PER_NODE", "3"), ("SLURM_JOB_ID", "4242")]),
            _ => v(&[("OMPI_COMM_WORLD_RANK", &r), ("OMPI_COMM_WORLD_SIZE", "3"), ("OMPI_COMM_WORLD_LOCAL_RANK", &r), ("OMPI_COMM_WORLD_LOCAL_SIZE", "3")]),
        }
    };
    for source in ["slurm", "mpirun"] {
        let store = listener();
        let port = store.local_addr().unwrap().port().to_string();
        let children: Vec<_> = (0..3)
            .map(|rank| {
                let mut cmd = ferrospeed();
                cmd.args(["comm", "check", "--sizes", "0,3,1001"]).env("MASTER_ADDR", "127.0.0.1").env("MASTER_PORT", &port);
                for var in ["RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "FERROSPEED_AGENT_STORE"] {
                    cmd.env_remove(var);
                }
                cmd.envs(vars(source, rank));
                if rank == 0 {
                    hand_over(&mut cmd, &store);
                }
                start(&mut cmd)
            })
            .collect();
        let done: Vec<Finished> = children.into_iter().map(|c| finish(c, Duration::from_secs(60))).collect();
        for (rank, f) in done.iter().enumerate() {
            assert!(f.status.success(), "{source} rank {rank}: {}", f.stderr);
            assert!(f.stdout.contains(&format!("rank {rank} digest")), "{source} rank {rank}: {}", f.stdout);
        }
        assert!(done[0].stdout.contains("on 3 ranks: all passed"), "{source}: {}", done[0].stdout);
    }
}

/// The pid of the process among `launcher`'s children whose environment has `RANK=rank`.
fn rank_pid(launcher: u32, rank: usize) -> Option<i32> {
    let tasks = std::fs::read_dir(format!("/proc/{launcher}/task")).ok()?;
    let children: Vec<i32> = tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("children")).ok())
        .flat_map(|c| c.split_whitespace().filter_map(|p| p.parse().ok()).collect::<Vec<i32>>())
        .collect();
    let wanted = format!("RANK={rank}");
    children.into_iter().find(|pid| {
        std::fs::read(format!("/proc/{pid}/environ")).is_ok_and(|env| env.split(|b| *b == 0).any(|kv| kv == wanted.as_bytes()))
    })
}

#[test]
fn a_stalled_rank_fails_the_job_after_the_collective_timeout_from_the_flag_or_the_environment() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), TINY, "steps = 100000\nglobal_batch = 4\nmicro_batch = 2\nwarmup = 1");
    for how in ["flag", "environment"] {
        let track = dir.path().join(how);
        let mut cmd = ferrospeed();
        cmd.arg("launch").args(["--nproc-per-node", "2"]);
        match how {
            "flag" => cmd.args(["--collective-timeout", "2"]).env_remove("FERROSPEED_COLLECTIVE_TIMEOUT_S"),
            _ => cmd.env("FERROSPEED_COLLECTIVE_TIMEOUT_S", "2"),
        };
        cmd.args(["train", "--config"]).arg(&config).arg("--set").arg(format!("track.dir={}", track.display()));
        let child = start(&mut cmd);
        let t0 = std::time::Instant::now();
        while std::fs::read_to_string(track.join("metrics.jsonl")).map_or(0, |m| m.lines().count()) < 2 {
            assert!(t0.elapsed() < Duration::from_secs(120), "{how}: training did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        let pid = rank_pid(child.id(), 1).expect("rank 1 is a child of the launcher");
        // Rank 1 stops in the middle of training, as a hung process would: alive, silent.
        unsafe { libc::kill(pid, libc::SIGSTOP) };
        let stopped = std::time::Instant::now();
        let f = finish(child, Duration::from_secs(120));
        let waited = stopped.elapsed();
        assert!(!f.status.success(), "{how}: {}", f.stderr);
        assert!(f.stderr.contains("timed out") && f.stderr.contains("rank 1"), "{how}: the error names the stalled rank: {}", f.stderr);
        // It waited for the 2 s timeout (less the part of it rank 0 may have spent before the stop),
        // not for the 300 s default.
        assert!(waited >= Duration::from_millis(1500) && waited < Duration::from_secs(60), "{how}: failed after {waited:?}");
        assert_eq!(survivors(&[pid], Duration::from_secs(10)), Vec::<i32>::new(), "{how}: the stopped rank is killed");
    }
    let f = run(
        ferrospeed().env("FERROSPEED_COLLECTIVE_TIMEOUT_S", "soon").args(["train", "--config"]).arg(&config).arg("--set").arg(format!("track.dir={}", dir.path().join("bad").display())),
        Duration::from_secs(60),
    );
    assert!(!f.status.success());
    assert_eq!(f.stderr.trim().lines().count(), 1, "one line please: {}", f.stderr);
    assert!(f.stderr.contains("FERROSPEED_COLLECTIVE_TIMEOUT_S") && f.stderr.contains("soon") && f.stderr.contains("seconds"), "{}", f.stderr);
}

#[test]
fn bad_input_is_one_line_exit_2_and_starts_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("started");
    let program = format!("touch {}", marker.display());
    let busy = listener();
    let busy_port = busy.local_addr().unwrap().port().to_string();
    let refusing = RefusingPort::new();
    let closed_port = refusing.port.to_string();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["--bogus-flag"], "unexpected argument '--bogus-flag'"),
        (vec!["--nproc-per-node", "0"], "must be at least 1"),
        (vec!["--master-port", &busy_port], "pass a free --master-port"),
        (vec!["--master-port", "70000"], "70000 is not in 0..=65535"),
        (vec!["--master-port", "http"], "invalid value 'http'"),
        (vec!["--nnodes", "2", "--node-rank", "1", "--master-port", &closed_port, "--rdzv-timeout", "1", "--rdzv-token", "0123456789abcdef0123"], "cannot reach node 0"),
        (vec!["--nnodes", "2", "--node-rank", "1", "--master-port", &closed_port], "needs a rendezvous secret shared by every node"),
        (vec!["--rdzv-token", "short"], "at least 16"),
        (vec!["--rdzv-token-file", "/no/such/token"], "cannot read it"),
        (vec!["--master-addr", "no-such-host.invalid"], "cannot be resolved"),
        (vec!["--nnodes", "2", "--node-rank", "2"], "--node-rank 2 is out of range"),
        (vec!["--nnodes", "2", "--master-port", "0"], "--master-port 0"),
        (vec!["--collective-timeout", "0"], "not a positive number of seconds"),
    ];
    for (flags, expect) in cases {
        let mut args = vec!["launch"];
        args.extend(&flags);
        args.extend(["sh", "-c", &program]);
        let f = run(ferrospeed().env_remove("FERROSPEED_RDZV_TOKEN").args(&args), Duration::from_secs(30));
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
    drop((busy, refusing));
}

#[test]
fn a_node_without_the_jobs_token_is_refused_in_one_line_and_starts_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let good = token_file(dir.path(), "good", "5f0e7a9c3b1d4e6f8a2c0b9d7e5f3a1c");
    let bad = token_file(dir.path(), "bad", "0000000000000000000000000000000000");
    let store = listener();
    let port = store.local_addr().unwrap().port().to_string();
    let node = |rank: &str, token: &std::path::Path, program: &str| {
        let mut cmd = ferrospeed();
        cmd.env_remove("FERROSPEED_RDZV_TOKEN").args(["launch", "--nnodes", "2", "--node-rank", rank, "--master-port", &port, "--rdzv-timeout", "20"]);
        cmd.arg("--rdzv-token-file").arg(token).args(["sh", "-c", program]);
        cmd
    };
    // Node 0 serves the store until the test stops it.
    let mut n0 = node("0", &good, "sleep 60");
    hand_over(&mut n0, &store);
    let n0 = start(&mut n0);
    let marker = dir.path().join("started");
    let f = run(&mut node("1", &bad, &format!("touch {}", marker.display())), Duration::from_secs(30));
    assert_eq!(f.status.code(), Some(2), "{}", f.stderr);
    assert_eq!(f.stderr.trim().lines().count(), 1, "one line please: {}", f.stderr);
    assert!(f.stderr.contains("refused this process's rendezvous token") && f.stderr.contains("--rdzv-token"), "{}", f.stderr);
    assert!(!marker.exists(), "a rank was started");
    // (A stopped node 0 would wait a minute for node 1 to finish; its guard takes the ranks with it.)
    unsafe { libc::kill(n0.id() as i32, libc::SIGKILL) };
    finish(n0, Duration::from_secs(30));
}

#[test]
fn each_launch_gives_its_ranks_a_fresh_token_in_their_environment_only() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display();
    let tokens: Vec<String> = (0..2)
        .map(|attempt| {
            let script = format!("echo \"$FERROSPEED_RDZV_TOKEN\" > {d}/token.{attempt}.$RANK; tr '\\0' ' ' < /proc/$$/cmdline > {d}/cmdline.$RANK");
            let f = run(ferrospeed().env_remove("FERROSPEED_RDZV_TOKEN").args(["launch", "--nproc-per-node", "2", "sh", "-c", &script]), Duration::from_secs(30));
            assert!(f.status.success(), "{}", f.stderr);
            let read = |rank: usize| std::fs::read_to_string(dir.path().join(format!("token.{attempt}.{rank}"))).unwrap().trim().to_string();
            let token = read(0);
            assert_eq!(token, read(1), "one token for the job's ranks");
            assert_eq!(token.len(), 64, "{token}");
            for rank in 0..2 {
                let cmdline = std::fs::read_to_string(dir.path().join(format!("cmdline.{rank}"))).unwrap();
                assert!(!cmdline.contains(&token), "the token is on a command line: {cmdline}");
            }
            token
        })
        .collect();
    assert_ne!(tokens[0], tokens[1], "every launch makes its own");
}

/// A field of `/proc/PID/status` in kB (`VmHWM`, `VmRSS`) or as a count (`Threads`).
fn proc_status(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with(&format!("{field}:")))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// The rendezvous store's command frame as the first protocol took it: `cmd ‖ len ‖ key ‖ arg ‖ len ‖ value`.
fn store_command(cmd: u8, key: &[u8], value: &[u8]) -> Vec<u8> {
    let mut msg = vec![cmd];
    msg.extend_from_slice(&(key.len() as u32).to_le_bytes());
    msg.extend_from_slice(key);
    msg.extend_from_slice(&0u64.to_le_bytes());
    msg.extend_from_slice(&(value.len() as u32).to_le_bytes());
    msg.extend_from_slice(value);
    msg
}

/// Read until the peer closes `conn` or `limit` passes; whether it closed.
fn closed_within(mut conn: &std::net::TcpStream, limit: Duration) -> bool {
    use std::io::Read;
    let start = std::time::Instant::now();
    let mut buf = [0u8; 4096];
    while start.elapsed() < limit {
        conn.set_read_timeout(Some(limit.saturating_sub(start.elapsed()).max(Duration::from_millis(1)))).unwrap();
        match conn.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => return false,
            Err(_) => return true, // reset: closed with our bytes unread
        }
    }
    false
}

#[test]
fn a_jobs_store_shrugs_off_garbage_idle_connections_huge_claims_and_a_forged_failure() {
    use std::io::Write;
    use std::net::TcpStream;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), TINY, "steps = 30\nglobal_batch = 4\nmicro_batch = 2\nwarmup = 1");
    let quiet = train(2, &config, &dir.path().join("quiet"), &[]);

    let store = listener();
    let addr = store.local_addr().unwrap();
    let track = dir.path().join("attacked");
    let mut cmd = train_command(2, &config, &track, &[]);
    hand_over(&mut cmd, &store);
    let child = start(&mut cmd);
    // The port is the launcher's alone now: if the attack stops the job, connecting fails at once.
    drop(store);
    let launcher = child.id();
    // If an assertion fails while the ranks are paused, kill the launcher (its guard takes the ranks).
    struct KillOnPanic(u32);
    impl Drop for KillOnPanic {
        fn drop(&mut self) {
            if std::thread::panicking() {
                unsafe { libc::kill(self.0 as i32, libc::SIGKILL) };
            }
        }
    }
    let cleanup = KillOnPanic(launcher);
    // Peak memory and threads of the launcher, sampled until it exits.
    let sampler = std::thread::spawn(move || {
        let (mut hwm, mut threads) = (0, 0);
        while let (Some(h), Some(t)) = (proc_status(launcher, "VmHWM"), proc_status(launcher, "Threads")) {
            (hwm, threads) = (hwm.max(h), threads.max(t));
            std::thread::sleep(Duration::from_millis(20));
        }
        (hwm, threads)
    });
    let t0 = std::time::Instant::now();
    while std::fs::read_to_string(track.join("metrics.jsonl")).map_or(0, |m| m.lines().count()) < 2 {
        assert!(t0.elapsed() < Duration::from_secs(120), "training did not start");
        std::thread::sleep(Duration::from_millis(10));
    }
    // The ranks pause mid-training, so the whole attack lands on a live job however fast this machine is.
    let ranks: Vec<i32> = (0..2).map(|r| rank_pid(launcher, r).expect("the ranks are running")).collect();
    for pid in &ranks {
        unsafe { libc::kill(*pid, libc::SIGSTOP) };
    }
    let base_threads = proc_status(launcher, "Threads").unwrap();
    const GONE: &str = "the store is gone: the attack stopped the job";

    // 1. Garbage.
    let mut noise = 0x9E37_79B9_7F4A_7C15u64;
    for _ in 0..5 {
        let conn = TcpStream::connect(addr).expect(GONE);
        let bytes: Vec<u8> = (0..65536).map(|_| {
            noise ^= noise << 13;
            noise ^= noise >> 7;
            noise ^= noise << 17;
            noise as u8
        }).collect();
        let _ = (&conn).write_all(&bytes);
        assert!(closed_within(&conn, Duration::from_secs(30)), "garbage kept a connection open");
    }
    // 2. A well-formed SET of the failure key, without the secret: as the old protocol took it, and after
    //    a made-up answer to the challenge.
    let forged = store_command(1, b"ferrospeed/launch/failed", b"rank 1 (pid 1) exited with code 1");
    for answer in [&[][..], &[7u8; 64][..]] {
        let conn = TcpStream::connect(addr).expect(GONE);
        let _ = (&conn).write_all(&[answer, &forged[..]].concat());
        assert!(closed_within(&conn, Duration::from_secs(30)), "a forged SET kept its connection open");
    }
    // 3. Forty connections claiming 60 MB fields (after a made-up answer) and sending 8 MB of them,
    //    held open together.
    let claims: Vec<TcpStream> = (0..40)
        .map(|i| {
            let conn = TcpStream::connect(addr).expect(GONE);
            let key_claim = if i % 2 == 0 { 60u32 << 20 } else { 3 };
            let mut head = vec![7u8; 64];
            head.push(1);
            head.extend_from_slice(&key_claim.to_le_bytes());
            if key_claim == 3 {
                head.extend_from_slice(b"big");
                head.extend_from_slice(&0u64.to_le_bytes());
                head.extend_from_slice(&(60u32 << 20).to_le_bytes());
            }
            conn.set_write_timeout(Some(Duration::from_secs(5))).unwrap();
            let chunk = vec![0xAB; 64 << 10];
            if (&conn).write_all(&head).is_ok() {
                for _ in 0..128 {
                    if (&conn).write_all(&chunk).is_err() {
                        break;
                    }
                }
            }
            conn
        })
        .collect();
    // 4. A hundred idle connections, held open together.
    let idle: Vec<TcpStream> = (0..100).map(|_| TcpStream::connect(addr).expect(GONE)).collect();
    std::thread::sleep(Duration::from_millis(500));
    let attack_threads = proc_status(launcher, "Threads").unwrap();
    // The store drops what does not authenticate within its few seconds.
    let start = std::time::Instant::now();
    for conn in idle.iter().chain(&claims) {
        assert!(closed_within(conn, Duration::from_secs(60)), "an idle connection is still open after {:?}", start.elapsed());
    }
    let dropped_after = start.elapsed();
    drop((idle, claims));
    // Nothing above stopped the job: the paused ranks are alive (the launcher would have killed them
    // after its 3 s grace), and carry on.
    for pid in &ranks {
        assert!(alive(*pid), "rank {pid} was stopped by the attack");
    }
    // Our own client with another job's token is refused too, in one line.
    let stranger = ferrospeed::comm::RdzvToken::new("0123456789abcdef0123456789abcdef", "test").unwrap();
    let err = ferrospeed::comm::store::StoreClient::connect(&addr.to_string(), &stranger, Duration::from_secs(30)).err().expect("refused");
    assert!(err.to_string().contains("refused this process's rendezvous token"), "{err}");
    for pid in &ranks {
        unsafe { libc::kill(*pid, libc::SIGCONT) };
    }
    std::mem::forget(cleanup); // `finish` reaps the launcher: its pid is no longer ours to signal
    let f = finish(child, Duration::from_secs(300));
    let (hwm_kb, peak_threads) = sampler.join().unwrap();
    eprintln!(
        "launcher: VmHWM {:.1} MB, threads {base_threads} before the attack, {attack_threads} under it (peak {peak_threads}); \
         idle connections dropped within {dropped_after:?}",
        hwm_kb as f64 / 1024.0
    );
    assert!(f.status.success(), "the attacked job failed:\n{}\n{}", f.stdout, f.stderr);
    assert!(!f.stderr.contains("another node reported"), "{}", f.stderr);
    assert_eq!(bits(&metrics(&track)), bits(&quiet), "the attacked run's losses differ from the quiet run's");
    assert!(hwm_kb > 0 && hwm_kb < 100 * 1024, "the launcher's peak RSS is {hwm_kb} kB");
    assert!(attack_threads <= base_threads + 64 + 1, "{attack_threads} threads under attack, {base_threads} before");
}

#[test]
fn after_a_refused_start_the_other_ranks_finish_their_own_clean_up_and_a_hung_one_is_stopped() {
    // Rank 1 refuses its start at once (exit 2, bad input); rank 0 refuses the same input but needs a
    // moment to remove what its start wrote: SIGTERM at once would cut that short.
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display();
    let script = format!("if [ \"$RANK\" = 1 ]; then exit 2; fi; sleep 1; touch {d}/cleaned; exit 2");
    let f = run(ferrospeed().args(["launch", "--nproc-per-node", "2", "sh", "-c", &script]), Duration::from_secs(30));
    assert_eq!(f.status.code(), Some(2), "{}", f.stderr);
    assert!(dir.path().join("cleaned").exists(), "rank 0 was stopped before it finished: {}", f.stderr);
    assert!(f.elapsed < Duration::from_secs(4), "the launcher waited {:?} after every rank had exited", f.elapsed);
    // A rank that does not exit after a refused start is still stopped, a few seconds later.
    let script = format!("sleep 300 & echo \"$$ $!\" > {d}/pid.$RANK; if [ \"$RANK\" = 1 ]; then exit 2; fi; wait");
    let f = run(ferrospeed().args(["launch", "--nproc-per-node", "2", "sh", "-c", &script]), Duration::from_secs(60));
    assert_eq!(f.status.code(), Some(2), "{}", f.stderr);
    assert!(f.stderr.contains("rank 1 (pid") && f.stderr.contains("exited with code 2"), "{}", f.stderr);
    assert!(f.elapsed < Duration::from_secs(20), "took {:?}", f.elapsed);
    assert_eq!(survivors(&pids_in(dir.path()), Duration::from_secs(2)), Vec::<i32>::new(), "no process may survive");
}

#[test]
fn a_refused_start_on_another_node_lets_this_nodes_ranks_finish_their_clean_up() {
    // Node 1's rank refuses at once (exit 2); node 0's rank 0 refuses the same input after a moment
    // of clean-up. Node 0 learns of node 1's failure through the store and must not cut it short.
    let dir = tempfile::tempdir().unwrap();
    let token = token_file(dir.path(), "token", "5f0e7a9c3b1d4e6f8a2c0b9d7e5f3a1c");
    let store = listener();
    let port = store.local_addr().unwrap().port().to_string();
    let node = |rank: &str, program: &str| {
        let mut cmd = ferrospeed();
        cmd.env_remove("FERROSPEED_RDZV_TOKEN").args(["launch", "--nnodes", "2", "--node-rank", rank, "--master-port", &port, "--rdzv-timeout", "20"]);
        cmd.arg("--rdzv-token-file").arg(&token).args(["sh", "-c", program]);
        cmd
    };
    let cleaned = dir.path().join("cleaned");
    let mut n0 = node("0", &format!("sleep 1.5; touch {}; exit 2", cleaned.display()));
    hand_over(&mut n0, &store);
    let n0 = start(&mut n0);
    let f1 = run(&mut node("1", "exit 2"), Duration::from_secs(30));
    assert_eq!(f1.status.code(), Some(2), "{}", f1.stderr);
    let f0 = finish(n0, Duration::from_secs(30));
    assert_eq!(f0.status.code(), Some(2), "{}", f0.stderr);
    assert!(cleaned.exists(), "node 0's rank was stopped before it finished: {}", f0.stderr);
}
