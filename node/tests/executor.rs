//! The containerd executor against a real containerd (a private one per test, started by the
//! harness on its own socket): image import, the job sandbox (read-only input, network,
//! memory, timeout), kill, reattach after the executor went away, the node's own containerd
//! process, and no leftovers in containerd after any test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::ErrorKind;
use std::net::{TcpListener, UdpSocket};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::containerd::{TestContainerd, build_busybox_image};
use kaapana_node::executor::containerd::{LABEL_JOB, new_container_id};
use kaapana_node::executor::{
    Containerd, ContainerdExecutor, ExecError, Executor, JobOutcome, JobRun, JobWork, lifecycle,
};
use kaapana_protocol::{ExecutorKind, ExitStatus, ImageDigest, Sha256Digest, ValidationError};

fn read(p: &std::path::Path) -> String {
    std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn import_is_idempotent_and_gzip_layers_work() {
    let ctd = TestContainerd::start().await;
    let exec = ctd.executor().await;
    assert_eq!(exec.kind(), ExecutorKind::Containerd);

    let image = build_busybox_image(ctd.dir.path(), "busybox", false);
    assert!(!exec.has_image(&image.digest).await.unwrap());
    assert_eq!(exec.import_image(&image.tar).await.unwrap(), image.digest);
    assert!(exec.has_image(&image.digest).await.unwrap());
    let layers_before = ctd.inventory().await.snapshots;
    assert_eq!(exec.import_image(&image.tar).await.unwrap(), image.digest);
    assert!(exec.has_image(&image.digest).await.unwrap());
    assert_eq!(ctd.inventory().await.snapshots, layers_before, "a re-import adds nothing");
    let listed = exec.list_images().await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].digest, image.digest);

    // A gzip layer: containerd's Diff.Apply decompresses it; the image runs.
    let gz = build_busybox_image(ctd.dir.path(), "busybox-gz", true);
    assert_eq!(exec.import_image(&gz.tar).await.unwrap(), gz.digest);
    let job = ctd.job("gz", gz.digest, "cat /etc/image-tag; echo; id -u");
    let out = exec.run(job.clone()).await.unwrap();
    assert_eq!(out.exit, ExitStatus::Exited(0));
    assert!(out.finished_at >= out.started_at);
    assert_eq!(read(&job.log), "busybox-gz\n0\n");
    assert_eq!(exec.list_images().await.unwrap().len(), 2);
    ctd.assert_clean().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn job_hashes_its_read_only_input() {
    let ctd = TestContainerd::start().await;
    let exec = ctd.executor().await;
    let image = ctd.busybox(&exec).await;

    let input = ctd.dir.path().join("dataset");
    std::fs::create_dir_all(&input).unwrap();
    let files: Vec<(&str, Vec<u8>)> = vec![
        ("a.dcm", b"first series".to_vec()),
        ("b.dcm", (0..=255u8).cycle().take(300_000).collect()),
        ("c.dcm", Vec::new()),
    ];
    for (name, data) in &files {
        std::fs::write(input.join(name), data).unwrap();
    }
    let mut job = ctd.job(
        "hash",
        image,
        "sha256sum /input/* > /output/hashes.txt && if touch /input/new 2>/dev/null; then exit 3; fi",
    );
    job.input = Some(input.clone());
    let out = exec.run(job.clone()).await.unwrap();
    assert_eq!(out.exit, ExitStatus::Exited(0), "log: {}", read(&job.log));

    let expected: String = files
        .iter()
        .map(|(name, data)| format!("{}  /input/{name}\n", Sha256Digest::of(data).hex()))
        .collect();
    assert_eq!(read(&job.output.join("hashes.txt")), expected);
    assert!(!input.join("new").exists(), "/input is read-only");
    ctd.assert_clean().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_results_appear_under_input() {
    let ctd = TestContainerd::start().await;
    let exec = ctd.executor().await;
    let image = ctd.busybox(&exec).await;

    let dataset = ctd.dir.path().join("dataset");
    let seg = ctd.dir.path().join("seg-result");
    std::fs::create_dir_all(&dataset).unwrap();
    std::fs::create_dir_all(&seg).unwrap();
    std::fs::write(dataset.join("a.txt"), "dataset\n").unwrap();
    std::fs::write(seg.join("b.txt"), "upstream\n").unwrap();

    let script = "cat /input/a.txt /input/seg/b.txt > /output/both.txt; ls /input > /output/ls.txt";
    let mut job = ctd.job("upstream", image, script);
    job.input = Some(dataset.clone());
    job.upstream = vec![("seg".into(), seg.clone())];
    let out = exec.run(job.clone()).await.unwrap();
    assert_eq!(out.exit, ExitStatus::Exited(0), "log: {}", read(&job.log));
    assert_eq!(read(&job.output.join("both.txt")), "dataset\nupstream\n");
    assert_eq!(read(&job.output.join("ls.txt")), "a.txt\nseg\n");
    assert!(!dataset.join("seg").exists(), "the dataset folder is untouched");

    // Upstream results without a dataset.
    let mut job = ctd.job("upstream-only", image, "ls /input; cat /input/seg/b.txt");
    job.upstream = vec![("seg".into(), seg)];
    let out = exec.run(job.clone()).await.unwrap();
    assert_eq!(out.exit, ExitStatus::Exited(0), "log: {}", read(&job.log));
    assert_eq!(read(&job.log), "seg\nupstream\n");
    ctd.assert_clean().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn job_has_no_network_but_loopback() {
    let ctd = TestContainerd::start().await;
    let exec = ctd.executor().await;
    let image = ctd.busybox(&exec).await;

    let listener = TcpListener::bind("0.0.0.0:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port();
    // This machine's address on its default route, if it has one (no packet is sent).
    let host_ip = UdpSocket::bind("0.0.0.0:0")
        .and_then(|s| s.connect("192.0.2.1:9").map(|()| s))
        .and_then(|s| s.local_addr())
        .map(|a| a.ip().to_string())
        .unwrap_or_else(|_| "127.0.0.1".into());

    let script = format!(
        "cat /proc/net/dev > /output/dev.txt; ip -o link > /output/link.txt; \
         cat /proc/self/status > /output/status.txt; \
         nc -w 2 127.0.0.1 {port} </dev/null && exit 10; \
         nc -w 2 {host_ip} {port} </dev/null && exit 11; exit 1"
    );
    let job = ctd.job("net", image, &script);
    let out = exec.run(job.clone()).await.unwrap();
    assert_eq!(out.exit, ExitStatus::Exited(1), "both connections fail; log: {}", read(&job.log));

    let dev = read(&job.output.join("dev.txt"));
    let ifaces: Vec<&str> =
        dev.lines().skip(2).filter_map(|l| l.split(':').next()).map(str::trim).collect();
    assert_eq!(ifaces, ["lo"], "{dev}");
    let links = read(&job.output.join("link.txt"));
    assert_eq!(links.lines().count(), 1, "{links}");
    assert!(links.contains(": lo:"), "{links}");
    // The rest of the sandbox: no new privileges, a short capability list.
    let status = read(&job.output.join("status.txt"));
    assert!(status.contains("NoNewPrivs:\t1"), "{status}");
    // CHOWN 0, DAC_OVERRIDE 1, FOWNER 3, FSETID 4, KILL 5, SETGID 6, SETUID 7.
    assert!(status.contains("CapBnd:\t00000000000000fb"), "{status}");
    assert!(status.contains("CapEff:\t00000000000000fb"), "{status}");
    assert_eq!(
        listener.accept().map(|_| ()).map_err(|e| e.kind()),
        Err(ErrorKind::WouldBlock),
        "the host's listener got no connection"
    );
    ctd.assert_clean().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_limit_ends_in_out_of_memory() {
    let ctd = TestContainerd::start().await;
    let exec = ctd.executor().await;
    let image = ctd.busybox(&exec).await;

    let mut job = ctd.job("oom", image, "x=$(yes | head -c 200000000); echo ${#x}");
    job.limits.memory_bytes = 32 << 20;
    let out = exec.run(job.clone()).await.unwrap();
    assert_eq!(out.exit, ExitStatus::OutOfMemory, "log: {}", read(&job.log));
    assert!(read(&job.log).contains("exceeded its memory limit"));
    ctd.assert_clean().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeout_kills_the_job() {
    let ctd = TestContainerd::start().await;
    let exec = ctd.executor().await;
    let image = ctd.busybox(&exec).await;

    let mut job = ctd.job("timeout", image, "");
    if let JobWork::Container { command, .. } = &mut job.work {
        *command = vec!["sleep".into(), "30".into()];
    }
    job.timeout = Duration::from_secs(1);
    let t = Instant::now();
    let out = exec.run(job.clone()).await.unwrap();
    let took = t.elapsed();
    assert_eq!(out.exit, ExitStatus::TimedOut);
    assert!(took < Duration::from_secs(5), "run() took {took:?}");
    assert!(out.finished_at.duration_since(out.started_at) >= Duration::from_millis(900));
    assert!(read(&job.log).contains("timeout"));
    ctd.assert_clean().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn image_tag_or_missing_digest_is_refused() {
    // A tag cannot even be expressed.
    assert!(matches!(ImageDigest::parse("busybox:latest"), Err(ValidationError::ImageTag { .. })));

    let ctd = TestContainerd::start().await;
    let exec = ctd.executor().await;
    ctd.busybox(&exec).await;
    let missing = ImageDigest(Sha256Digest::of(b"no such image"));
    assert!(!exec.has_image(&missing).await.unwrap());
    let job = ctd.job("missing", missing, "true");
    let e = exec.run(job.clone()).await.unwrap_err();
    assert!(matches!(e, ExecError::ImageNotFound { digest } if digest == missing), "{e:?}");
    assert_eq!(
        e.to_string(),
        format!(
            "image {missing} is not in containerd; import it with \
             `kaapana-node image import FILE.tar`"
        )
    );
    assert_eq!(std::fs::read_dir(&job.output).unwrap().count(), 0);
    ctd.assert_clean().await;
}

/// Polls until the executor lists the job as running.
async fn until_running(exec: &dyn Executor, job: &kaapana_protocol::JobId) {
    let until = Instant::now() + Duration::from_secs(10);
    while !exec.running().await.unwrap().contains(job) {
        assert!(Instant::now() < until, "the job never showed up");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_aborts_a_running_job() {
    let ctd = TestContainerd::start().await;
    let exec = Arc::new(ctd.executor().await);
    let image = ctd.busybox(&exec).await;

    let mut job = ctd.job("kill", image, "echo started; exec sleep 30");
    job.limits.cpu_millis = 500;
    let id = job.job_id;
    let log = job.log.clone();
    let runner = {
        let exec = Arc::clone(&exec);
        tokio::spawn(async move { exec.run(job).await })
    };
    until_running(&*exec, &id).await;
    // The job's process runs (and so its cgroup exists) once it has written its first line.
    let until = Instant::now() + Duration::from_secs(10);
    while !std::fs::read_to_string(&log).unwrap_or_default().contains("started") {
        assert!(Instant::now() < until, "the job never started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The CPU limit is the cgroup's CFS quota (cgroup v1 or v2).
    let cids = exec.containers_of(&id).await.unwrap();
    assert_eq!(cids.len(), 1, "one container per start: {cids:?}");
    let cg = format!("kaapana-node/{}", cids[0]);
    let quota = std::fs::read_to_string(format!("/sys/fs/cgroup/cpu/{cg}/cpu.cfs_quota_us"))
        .or_else(|_| std::fs::read_to_string(format!("/sys/fs/cgroup/{cg}/cpu.max")))
        .unwrap();
    assert!(quota.starts_with("50000"), "{quota}");
    let t = Instant::now();
    exec.kill(&id).await.unwrap();
    let out = runner.await.unwrap().unwrap();
    assert_eq!(out.exit, ExitStatus::Killed(9));
    assert!(t.elapsed() < Duration::from_secs(5));
    assert!(exec.running().await.unwrap().is_empty());
    assert!(matches!(exec.kill(&id).await, Err(ExecError::JobNotFound { .. })));
    ctd.assert_clean().await;
}

/// Runs `job` in the background and waits until containerd has its task.
async fn start_until_task(
    ctd: &TestContainerd,
    exec: &Arc<ContainerdExecutor>,
    job: JobRun,
) -> tokio::task::JoinHandle<Result<JobOutcome, ExecError>> {
    let id = job.job_id;
    let runner = {
        let exec = Arc::clone(exec);
        tokio::spawn(async move { exec.run(job).await })
    };
    until_running(&**exec, &id).await;
    let until = Instant::now() + Duration::from_secs(10);
    while ctd.inventory().await.tasks.is_empty() {
        assert!(Instant::now() < until, "the task never started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    runner
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reattach_after_the_executor_went_away() {
    let ctd = TestContainerd::start().await;
    let first = Arc::new(ctd.executor().await);
    let image = ctd.busybox(&first).await;

    let job = ctd.job("reattach", image, "echo started; sleep 3; echo done > /output/x");
    let (id, log, output) = (job.job_id, job.log.clone(), job.output.clone());
    let runner = start_until_task(&ctd, &first, job).await;
    // A created task is not yet a started one: wait for the job's first line.
    let until = Instant::now() + Duration::from_secs(10);
    while !std::fs::read_to_string(&log).unwrap_or_default().contains("started") {
        assert!(Instant::now() < until, "the job never started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The node process goes away: its run() is dropped mid-job, without any cleanup.
    runner.abort();
    assert!(runner.await.unwrap_err().is_cancelled());
    drop(first);

    let second = ctd.executor().await;
    assert_eq!(second.running().await.unwrap(), vec![id]);
    assert_eq!(ctd.inventory().await.tasks.len(), 1, "containerd kept the task");
    let out = second.reattach(&id, &log).await.unwrap();
    assert_eq!(out.exit, ExitStatus::Exited(0), "log: {}", read(&log));
    assert_eq!(read(&output.join("x")), "done\n");
    second.cleanup(&id).await.unwrap();
    assert!(second.running().await.unwrap().is_empty());
    ctd.assert_clean().await;
    assert!(matches!(second.reattach(&id, &log).await, Err(ExecError::JobNotFound { .. })));
    assert!(read(&log).contains("container is gone"));
}

fn pid_gone(pid: u32) -> bool {
    !std::path::Path::new(&format!("/proc/{pid}")).exists()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn own_containerd_starts_answers_and_stops() {
    let dir = tempfile::tempdir().unwrap();
    let containerd = Containerd::spawn(dir.path()).await.unwrap();
    let pid = containerd.pid().expect("an owned containerd has a pid");
    assert!(!pid_gone(pid));
    assert!(containerd.version().await.unwrap().starts_with('1'));
    assert_eq!(containerd.socket(), dir.path().join("containerd/containerd.sock"));
    assert!(dir.path().join("containerd/config.toml").exists());

    // Supervised: a containerd that dies is restarted.
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::SIGKILL)
        .unwrap();
    let until = Instant::now() + Duration::from_secs(10);
    let restarted = loop {
        if let Some(p) = containerd.pid().filter(|p| *p != pid) {
            break p;
        }
        assert!(Instant::now() < until, "containerd was not restarted");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let until = Instant::now() + Duration::from_secs(10);
    while containerd.version().await.is_err() {
        assert!(Instant::now() < until, "the restarted containerd does not answer");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    containerd.shutdown().await;
    assert!(pid_gone(restarted), "shutdown stops containerd");
    assert!(!dir.path().join("containerd/containerd.pid").exists());

    // A containerd left running by a node that was killed is adopted, and stopped by it.
    let mut orphan = std::process::Command::new("containerd")
        .arg("--config")
        .arg(dir.path().join("containerd/config.toml"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::fs::write(dir.path().join("containerd/containerd.pid"), orphan.id().to_string()).unwrap();
    let adopted = Containerd::spawn(dir.path()).await.unwrap();
    assert_eq!(adopted.pid(), Some(orphan.id()));
    assert!(adopted.version().await.is_ok());
    adopted.shutdown().await;
    // A multi-threaded process shows as a zombie before its last thread is gone; it can be
    // reaped a moment later.
    let until = Instant::now() + Duration::from_secs(10);
    while orphan.try_wait().unwrap().is_none() {
        assert!(Instant::now() < until, "the adopted containerd was not stopped");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // A data dir too long for a Unix socket path: the socket moves to /run; drop stops it.
    let long = dir.path().join("x".repeat(60)).join("y".repeat(60));
    let socket = lifecycle::socket_path_for(&long);
    assert!(socket.starts_with("/run"), "{}", socket.display());
    let containerd = Containerd::spawn(&long).await.unwrap();
    let pid = containerd.pid().unwrap();
    assert_eq!(containerd.socket(), socket);
    assert!(!containerd.version().await.unwrap().is_empty());
    // A connection to a running containerd does not own it.
    let connected = Containerd::connect(&socket).await.unwrap();
    assert_eq!(connected.pid(), None);
    drop(connected);
    assert!(!pid_gone(pid));
    drop(containerd);
    assert!(pid_gone(pid), "drop stops containerd");
    let _ = std::fs::remove_dir_all(socket.parent().unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reattach_to_a_job_that_never_started_cleans_it_up() {
    use common::containerd::req;
    use containerd_client::services::v1::snapshots::MountsRequest;
    use containerd_client::services::v1::snapshots::snapshots_client::SnapshotsClient;
    use containerd_client::services::v1::tasks_client::TasksClient;
    use containerd_client::services::v1::{
        CreateTaskRequest, DeleteTaskRequest, KillRequest, WaitRequest,
    };

    let ctd = TestContainerd::start().await;
    let first = Arc::new(ctd.executor().await);
    let image = ctd.busybox(&first).await;
    let job = ctd.job("never-started", image, "exec sleep 30");
    let (id, log) = (job.job_id, job.log.clone());
    let runner = start_until_task(&ctd, &first, job).await;
    runner.abort();
    drop(first);

    // Replace the running task by one that was created but never started, as if the node
    // had died between Tasks.Create and Tasks.Start.
    let cid = ctd.inventory().await.containers.pop().unwrap();
    let mut tasks = TasksClient::new(ctd.channel());
    let wait = {
        let mut tasks = tasks.clone();
        let r = req(WaitRequest { container_id: cid.clone(), exec_id: String::new() });
        tokio::spawn(async move { tasks.wait(r).await })
    };
    tasks
        .kill(req(KillRequest {
            container_id: cid.clone(),
            exec_id: String::new(),
            signal: 9,
            all: false,
        }))
        .await
        .unwrap();
    wait.await.unwrap().unwrap();
    tasks.delete(req(DeleteTaskRequest { container_id: cid.clone() })).await.unwrap();
    let mounts = SnapshotsClient::new(ctd.channel())
        .mounts(req(MountsRequest { snapshotter: "overlayfs".into(), key: cid.clone() }))
        .await
        .unwrap()
        .into_inner()
        .mounts;
    tasks
        .create(req(CreateTaskRequest {
            container_id: cid.clone(),
            rootfs: mounts,
            ..Default::default()
        }))
        .await
        .unwrap();
    assert_eq!(ctd.inventory().await.tasks, vec![cid]);

    let second = ctd.executor().await;
    assert_eq!(second.running().await.unwrap(), vec![id]);
    assert!(matches!(second.reattach(&id, &log).await, Err(ExecError::JobNotFound { .. })));
    assert!(read(&log).contains("never started"));
    ctd.assert_clean().await;
}

/// The shim race (issue 19): a node killed while containerd runs its `Tasks.Create` can leave
/// the job's container and snapshot without a task, but with the runtime's bundle directory,
/// and containerd then refuses any task of that container id ("failed to start shim: mkdir
/// …: file exists"). The next start of the job uses a fresh id, runs the job once and leaves
/// nothing in containerd.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_killed_inside_tasks_create_does_not_block_the_next_start() {
    use common::containerd::req;
    use containerd_client::services::v1::container::Runtime;
    use containerd_client::services::v1::containers_client::ContainersClient;
    use containerd_client::services::v1::snapshots::PrepareSnapshotRequest;
    use containerd_client::services::v1::snapshots::snapshots_client::SnapshotsClient;
    use containerd_client::services::v1::tasks_client::TasksClient;
    use containerd_client::services::v1::{Container, CreateContainerRequest, CreateTaskRequest};

    let ctd = TestContainerd::start().await;
    let first = ctd.executor().await;
    let image = ctd.busybox(&first).await;
    drop(first);
    let job = ctd.job("shim-race", image, "echo run >> /output/runs");
    let (id, log, output) = (job.job_id, job.log.clone(), job.output.clone());

    // What the killed node's start left: the container (labelled with the job) and its rootfs
    // snapshot, created in the executor's order, and the bundle of the interrupted shim start.
    let cid = new_container_id(&id);
    let layer = ctd.inventory().await.snapshots.into_keys().next().unwrap();
    let spec = br#"{"ociVersion":"1.0.2","root":{"path":"rootfs"},"process":{"args":["sh","-c","echo run >> /output/runs"],"cwd":"/"}}"#;
    ContainersClient::new(ctd.channel())
        .create(req(CreateContainerRequest {
            container: Some(Container {
                id: cid.clone(),
                labels: [(LABEL_JOB.to_owned(), id.to_string())].into(),
                runtime: Some(Runtime { name: "io.containerd.runc.v2".into(), options: None }),
                spec: Some(prost_types::Any {
                    type_url: "types.containerd.io/opencontainers/runtime-spec/1/Spec".into(),
                    value: spec.to_vec(),
                }),
                snapshotter: "overlayfs".into(),
                snapshot_key: cid.clone(),
                ..Container::default()
            }),
        }))
        .await
        .unwrap();
    let mounts = SnapshotsClient::new(ctd.channel())
        .prepare(req(PrepareSnapshotRequest {
            snapshotter: "overlayfs".into(),
            key: cid.clone(),
            parent: layer,
            labels: Default::default(),
        }))
        .await
        .unwrap()
        .into_inner()
        .mounts;
    let bundle = ctd
        .dir
        .path()
        .join("containerd/state/io.containerd.runtime.v2.task")
        .join(common::containerd::NAMESPACE)
        .join(&cid);
    std::fs::create_dir_all(&bundle).unwrap();
    std::fs::write(bundle.join("config.json"), spec).unwrap();
    // This is the state of the race: no task of this id can be created any more.
    let refused = TasksClient::new(ctd.channel())
        .create(req(CreateTaskRequest {
            container_id: cid.clone(),
            rootfs: mounts,
            ..Default::default()
        }))
        .await
        .unwrap_err();
    assert!(
        refused.message().contains("failed to start shim")
            && refused.message().contains("file exists"),
        "{refused:?}"
    );
    assert!(ctd.inventory().await.tasks.is_empty());

    // The restarted node: recovery finds the job's container by its label, sees that it never
    // started and removes it; the job starts again.
    let second = ctd.executor().await;
    assert_eq!(second.running().await.unwrap(), vec![id]);
    assert_eq!(second.containers_of(&id).await.unwrap(), vec![cid.clone()]);
    assert!(matches!(second.reattach(&id, &log).await, Err(ExecError::JobNotFound { .. })));
    assert!(read(&log).contains("never started"));
    ctd.assert_clean().await;
    assert!(bundle.exists(), "containerd's API cannot remove the stray bundle");

    let out = second.run(job.clone()).await.unwrap();
    assert_eq!(out.exit, ExitStatus::Exited(0), "log: {}", read(&log));
    assert_eq!(read(&output.join("runs")), "run\n", "the job ran exactly once");
    ctd.assert_clean().await;
}
