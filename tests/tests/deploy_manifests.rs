//! The deployment assets (`deploy/Dockerfile`, `deploy/k8s/`) agree with the code: binary
//! names, env var names, ports, probe paths, metric names, Redis key and group names, the
//! config file and the synced copies of the process definitions, alert rules, dashboard
//! and scripts. No network and no cluster: `deploy/k8s/validate.sh` checks the rendered
//! objects against the Kubernetes schemas; this checks their meaning.

use honua_shared::config::{Config, ENV_VARS};
use honua_shared::keys::{Keys, WORKERS_GROUP};
use honua_shared::metrics as m;
use serde::Deserialize;
use serde_json::Value;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(root().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// Every YAML document of a file, as JSON values.
fn docs(rel: &str) -> Vec<Value> {
    serde_yaml_ng::Deserializer::from_str(&read(rel))
        .map(|d| Value::deserialize(d).unwrap_or_else(|e| panic!("{rel}: {e}")))
        .filter(|v| !v.is_null())
        .collect()
}

/// The base's objects (the files its kustomization lists, plus the observability
/// component), and the KEDA component's.
fn base_objects() -> Vec<Value> {
    let k = &docs("deploy/k8s/base/kustomization.yaml")[0];
    let mut out = Vec::new();
    for r in k["resources"].as_array().unwrap() {
        out.extend(docs(&format!("deploy/k8s/base/{}", r.as_str().unwrap())));
    }
    let obs = &docs("deploy/k8s/base/observability/kustomization.yaml")[0];
    for r in obs["resources"].as_array().unwrap() {
        out.extend(docs(&format!(
            "deploy/k8s/base/observability/{}",
            r.as_str().unwrap()
        )));
    }
    out.extend(docs("deploy/k8s/components/keda/scaledobject.yaml"));
    out
}

fn find<'a>(objs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    objs.iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind}/{name} in deploy/k8s"))
}

/// The pod spec of a workload (Deployment, StatefulSet, CronJob).
fn pod_spec(o: &Value) -> &Value {
    match o["kind"].as_str().unwrap() {
        "CronJob" => &o["spec"]["jobTemplate"]["spec"]["template"]["spec"],
        _ => &o["spec"]["template"]["spec"],
    }
}

fn workloads(objs: &[Value]) -> Vec<&Value> {
    objs.iter()
        .filter(|o| {
            matches!(
                o["kind"].as_str(),
                Some("Deployment" | "StatefulSet" | "CronJob")
            )
        })
        .collect()
}

fn container<'a>(o: &'a Value, name: &str) -> &'a Value {
    pod_spec(o)["containers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no container {name}"))
}

fn env_value<'a>(c: &'a Value, name: &str) -> Option<&'a Value> {
    c["env"].as_array()?.iter().find(|e| e["name"] == name)
}

fn port_of(addr: &str) -> u64 {
    addr.parse::<std::net::SocketAddr>().unwrap().port() as u64
}

/// `[[bin]]` names of every workspace member.
fn workspace_bins() -> BTreeSet<String> {
    let mut bins = BTreeSet::new();
    let root = read("Cargo.toml");
    let members = root
        .lines()
        .find_map(|l| l.trim().strip_prefix("members = ["))
        .expect("the workspace lists its members on one line");
    let members: Vec<&str> = members
        .trim_end_matches(']')
        .split(',')
        .map(|m| m.trim().trim_matches('"'))
        .filter(|m| !m.is_empty())
        .collect();
    assert!(members.contains(&"cli"), "{members:?}");
    for member in members {
        let text = read(&format!("{member}/Cargo.toml"));
        let mut in_bin = false;
        for line in text.lines().map(str::trim) {
            if line.starts_with('[') {
                in_bin = line == "[[bin]]";
            } else if in_bin && let Some(v) = line.strip_prefix("name") {
                bins.insert(
                    v.trim_start_matches([' ', '='])
                        .trim()
                        .trim_matches('"')
                        .into(),
                );
            }
        }
    }
    bins
}

const IMAGE_BINS: &[&str] = &["honua-scheduler", "honua-worker", "honua", "honua-loadtest"];

#[test]
fn dockerfile_builds_the_workspace_binaries_as_a_non_root_user_from_pinned_images() {
    let df = read("deploy/Dockerfile");
    let lines: Vec<&str> = df
        .lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#'))
        .collect();
    // Base images pinned by tag; the builder is the toolchain of rust-toolchain.toml.
    let toolchain = read("rust-toolchain.toml");
    let channel = toolchain
        .lines()
        .find_map(|l| l.trim().strip_prefix("channel"))
        .unwrap()
        .trim_start_matches([' ', '='])
        .trim()
        .trim_matches('"')
        .to_string();
    let froms: Vec<&str> = lines
        .iter()
        .filter_map(|l| l.strip_prefix("FROM "))
        .map(|l| l.split_whitespace().next().unwrap())
        .collect();
    assert_eq!(froms.len(), 2, "builder + runtime: {froms:?}");
    for image in &froms {
        let (_, tag) = image
            .split_once(':')
            .unwrap_or_else(|| panic!("{image} is not pinned by tag"));
        assert!(
            tag != "latest" && tag.chars().any(|c| c.is_ascii_digit()),
            "{image}: pin a versioned tag"
        );
    }
    assert!(
        froms[0].starts_with(&format!("rust:{channel}-")),
        "builder {} must match rust-toolchain.toml {channel}",
        froms[0]
    );
    assert!(froms[1].starts_with("debian:"), "runtime {}", froms[1]);
    // Builder and runtime share the Debian release (glibc).
    assert!(froms[0].ends_with("-bookworm") && read("deploy/Dockerfile").contains("debian:12."));

    // Non-root USER (numeric, so runAsNonRoot can verify it), after the last FROM.
    let last_from = lines.iter().rposition(|l| l.starts_with("FROM ")).unwrap();
    let user = lines[last_from..]
        .iter()
        .rev()
        .find_map(|l| l.strip_prefix("USER "))
        .expect("USER in the runtime stage");
    let uid = user.split(':').next().unwrap();
    assert!(
        uid.parse::<u32>().is_ok_and(|u| u > 0),
        "USER {user}: non-root uid"
    );
    assert!(
        !lines.iter().any(|l| l.starts_with("HEALTHCHECK")),
        "Kubernetes probes, not HEALTHCHECK"
    );

    // The binaries: the workspace's [[bin]] targets, built and copied.
    let bins = workspace_bins();
    for b in IMAGE_BINS {
        assert!(bins.contains(*b), "{b} is not a [[bin]] target: {bins:?}");
    }
    let copied: BTreeSet<&str> = lines
        .iter()
        .filter_map(|l| l.strip_prefix("COPY --from=builder "))
        .flat_map(|l| {
            let parts: Vec<&str> = l.split_whitespace().collect();
            parts[..parts.len() - 1].to_vec()
        })
        .filter_map(|p| p.strip_prefix("/out/"))
        .collect();
    assert_eq!(
        copied,
        IMAGE_BINS.iter().copied().collect(),
        "binaries copied into the image"
    );
    let build_loop = lines
        .iter()
        .find(|l| l.starts_with("for b in ") && l.contains("cp \"target/release/$b\""))
        .expect("the loop copying the release binaries");
    let built: BTreeSet<&str> = build_loop["for b in ".len()..]
        .split(';')
        .next()
        .unwrap()
        .split_whitespace()
        .collect();
    assert_eq!(built, IMAGE_BINS.iter().copied().collect());
    for l in lines.iter().filter(|l| l.contains("cargo build")) {
        for p in ["honua-scheduler", "honua-worker", "honua-loadtest"] {
            assert!(l.contains(&format!("-p {p}")), "{l}: builds package {p}");
        }
        assert!(l.contains("--release") && l.contains("--locked"));
    }

    // Every path COPY'd from the build context exists.
    for l in &lines {
        let Some(rest) = l.strip_prefix("COPY ") else {
            continue;
        };
        if rest.starts_with("--from") {
            continue;
        }
        let parts: Vec<&str> = rest.split_whitespace().collect();
        for src in &parts[..parts.len() - 1] {
            assert!(root().join(src).exists(), "COPY {src}: no such path");
        }
    }
    assert!(df.contains("COPY processes /app/processes"));
}

fn copy_tree(from: &Path, to: &Path) {
    if from.is_dir() {
        std::fs::create_dir_all(to).unwrap();
        for e in std::fs::read_dir(from).unwrap() {
            let e = e.unwrap();
            copy_tree(&e.path(), &to.join(e.file_name()));
        }
    } else {
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::copy(from, to).unwrap_or_else(|e| panic!("{}: {e}", from.display()));
    }
}

/// The builder stage replayed without Docker: each `COPY` from the build context into an
/// empty directory, each `RUN` with its `cargo build` swapped for `cargo metadata --locked`
/// (which loads every workspace member's manifest and checks Cargo.lock), up to the build.
/// A workspace member the Dockerfile does not copy, or a lock file out of date, fails
/// here rather than in someone's `docker build`.
#[test]
fn dockerfile_builder_stage_loads_the_workspace() {
    let df = read("deploy/Dockerfile");
    // Instructions with their `\` continuations joined.
    let mut instrs: Vec<String> = Vec::new();
    let mut cur = String::new();
    for line in df.lines() {
        let t = line.trim();
        if t.starts_with('#') || (t.is_empty() && cur.is_empty()) {
            continue;
        }
        match t.strip_suffix('\\') {
            Some(head) => {
                cur.push_str(head);
                cur.push(' ');
            }
            None => {
                cur.push_str(t);
                instrs.push(std::mem::take(&mut cur));
            }
        }
    }
    let host = String::from_utf8(
        std::process::Command::new("rustc")
            .arg("-vV")
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap()
    .lines()
    .find_map(|l| l.strip_prefix("host: ").map(str::to_string))
    .unwrap();
    let metadata = format!(
        "cargo metadata --locked --offline --filter-platform {host} --format-version 1 >/dev/null"
    );
    let ctx = tempfile::tempdir().unwrap();
    let dir = ctx.path();
    let mut builds = 0;
    for ins in instrs
        .iter()
        .skip_while(|i| !i.starts_with("FROM "))
        .skip(1)
        .take_while(|i| !i.starts_with("FROM "))
    {
        if let Some(rest) = ins.strip_prefix("COPY ") {
            let parts: Vec<&str> = rest.split_whitespace().collect();
            let (srcs, dst) = parts.split_at(parts.len() - 1);
            let dst = dst[0];
            for src in srcs {
                let to = if dst.ends_with('/') || srcs.len() > 1 {
                    dir.join(dst).join(Path::new(src).file_name().unwrap())
                } else {
                    dir.join(dst)
                };
                copy_tree(&root().join(src), &to);
            }
        } else if let Some(script) = ins.strip_prefix("RUN ") {
            let at = script
                .find("cargo build")
                .unwrap_or_else(|| panic!("a RUN without cargo build: {script}"));
            let after = script[at..].split_once(';').map_or("", |(_, r)| r);
            // What follows the build in the first stage removes the stubs; in the second it
            // copies binaries out, which a metadata run does not produce.
            let tail = if after.contains("/out") { "" } else { after };
            let run = |metadata: &str| {
                let replayed = format!("{} {metadata}; {tail}", &script[..at]);
                let out = std::process::Command::new("sh")
                    .arg("-c")
                    .arg(&replayed)
                    .current_dir(dir)
                    .output()
                    .unwrap();
                (replayed, out)
            };
            let (mut replayed, mut out) = run(&metadata);
            if String::from_utf8_lossy(&out.stderr).contains("--offline was specified") {
                // A crate the test build never needed is not in the local cache: ask the
                // registry (the result is the same; offline is only faster).
                (replayed, out) = run(&metadata.replace(" --offline", ""));
            }
            assert!(
                out.status.success(),
                "RUN {replayed}\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
            builds += 1;
        }
    }
    assert_eq!(builds, 2, "the dependency layer and the build");
}

#[test]
fn manifests_use_the_code_s_binaries_env_vars_ports_and_probe_paths() {
    let objs = base_objects();
    let bins = workspace_bins();
    let defaults = Config::default();
    // Read by the `llm` step kind (its issue); optional secret keys until then.
    let other_env = ["RUST_LOG", "AZURE_OPENAI_API_KEY", "AZURE_OPENAI_ENDPOINT"];

    let sched = find(&objs, "Deployment", "honua-process-framework-scheduler");
    let worker = find(&objs, "Deployment", "honua-process-framework");
    assert_eq!(sched["spec"]["replicas"], 2);
    assert_eq!(worker["spec"]["replicas"], 3);
    let sc = container(sched, "scheduler");
    // The guide's `kubectl set image ... honua-cli=...` acts on the workers.
    let wc = container(worker, "honua-cli");
    assert_eq!(sc["command"][0], "honua-scheduler");
    assert_eq!(wc["command"][0], "honua-worker");
    for (c, role) in [(sc, "scheduler"), (wc, "worker")] {
        let cmd = c["command"][0].as_str().unwrap();
        assert!(bins.contains(cmd), "{cmd} is not a [[bin]] target");
        for e in c["env"].as_array().unwrap() {
            let name = e["name"].as_str().unwrap();
            assert!(
                ENV_VARS.contains(&name) || other_env.contains(&name),
                "{name}: not an env var the code reads (honua_shared::config::ENV_VARS)"
            );
        }
        // Each Deployment logs in as its own Redis user (deploy/redis/users.acl.template).
        let url = env_value(c, "HONUA_REDIS_URL").expect("HONUA_REDIS_URL");
        assert_eq!(url["valueFrom"]["secretKeyRef"]["name"], "redis-secret");
        assert_eq!(
            url["valueFrom"]["secretKeyRef"]["key"],
            format!("{role}-connection-string").as_str()
        );
    }

    // Gateway: port, probes and the Service of the guide (honua-process-framework:9090).
    let http_port = port_of(&defaults.listen_addr());
    assert_eq!(sc["ports"][0]["containerPort"], http_port);
    assert_eq!(sc["ports"][0]["name"], "http");
    let gateway = read("scheduler/src/gateway/mod.rs");
    for (probe, path) in [
        ("livenessProbe", "/health/live"),
        ("readinessProbe", "/health/ready"),
        ("startupProbe", "/health/live"),
    ] {
        assert_eq!(sc[probe]["httpGet"]["path"], path, "{probe}");
        assert_eq!(sc[probe]["httpGet"]["port"], "http");
        assert!(
            gateway.contains(&format!(".route(\"{path}\"")),
            "{path} is not a route"
        );
    }
    let svc = find(&objs, "Service", "honua-process-framework");
    assert_eq!(svc["spec"]["ports"][0]["port"], http_port);
    assert_eq!(svc["spec"]["ports"][0]["targetPort"], "http");
    for (k, v) in svc["spec"]["selector"].as_object().unwrap() {
        assert_eq!(&sched["spec"]["template"]["metadata"]["labels"][k], v);
    }

    // Worker: the metrics port, the drain deadline and the grace period.
    let metrics_port = port_of(&defaults.worker.metrics_addr);
    assert_eq!(wc["ports"][0]["containerPort"], metrics_port);
    let addr = env_value(wc, "HONUA_WORKER_METRICS_ADDR").unwrap()["value"]
        .as_str()
        .unwrap();
    assert_eq!(port_of(addr), metrics_port);
    assert_eq!(wc["livenessProbe"]["httpGet"]["port"], "metrics");
    let grace_ms: u64 = env_value(wc, "HONUA_SHUTDOWN_GRACE_MS").unwrap()["value"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let file_cfg = Config::load(
        Some(&root().join("deploy/k8s/base/config/honua.toml")),
        Vec::<(String, String)>::new(),
    )
    .unwrap();
    file_cfg.validate().unwrap();
    assert_eq!(grace_ms, file_cfg.worker.shutdown_grace_ms);
    // The ConfigMap's definitions load with this config: the shipped types' `llm` steps
    // need its [llm_provider], and the worker reads that provider's endpoint and key from
    // the variables it is given.
    let mut defs_cfg = file_cfg.clone();
    defs_cfg.definitions_dir = root().join("deploy/k8s/base/config/processes");
    let (defs, _) = honua_scheduler::load_definitions(&defs_cfg).unwrap();
    assert_eq!(defs.len(), shipped_definition_files().len());
    let azure = file_cfg
        .llm_provider
        .as_ref()
        .and_then(|l| l.azure.as_ref())
        .expect("[llm_provider.azure]");
    for var in [&azure.base_url_env, &azure.api_key_env] {
        let var = var
            .as_deref()
            .expect("endpoint and key from the environment");
        assert!(env_value(wc, var).is_some(), "the worker has no {var}");
    }
    let tgps = pod_spec(worker)["terminationGracePeriodSeconds"]
        .as_u64()
        .unwrap();
    assert!(
        tgps * 1000 >= grace_ms + 10_000,
        "terminationGracePeriodSeconds {tgps}s must exceed the {grace_ms} ms drain plus the hand-back"
    );

    // Config file and definitions: mounted where honua.toml says they are.
    for (d, c) in [(sched, sc), (worker, wc)] {
        assert_eq!(
            env_value(c, "HONUA_CONFIG").unwrap()["value"],
            "/etc/honua/honua.toml"
        );
        let mounts = c["volumeMounts"].as_array().unwrap();
        let defs_mount = mounts.iter().find(|m| m["name"] == "processes").unwrap();
        assert_eq!(
            Path::new(defs_mount["mountPath"].as_str().unwrap()),
            file_cfg.definitions_dir
        );
        let vol = pod_spec(d)["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == "processes")
            .unwrap();
        assert_eq!(vol["configMap"]["name"], "process-config");
        let keys: BTreeSet<&str> = vol["configMap"]["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["key"].as_str().unwrap())
            .collect();
        assert_eq!(
            keys,
            shipped_definition_files()
                .iter()
                .map(String::as_str)
                .collect()
        );
    }
}

fn shipped_definition_files() -> BTreeSet<String> {
    std::fs::read_dir(root().join("processes"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".toml") || n.ends_with(".yaml") || n.ends_with(".yml"))
        .collect()
}

#[test]
fn synced_copies_match_their_sources() {
    // Process definitions: byte-identical, and every one in the ConfigMap generator.
    let copies: BTreeSet<String> =
        std::fs::read_dir(root().join("deploy/k8s/base/config/processes"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
    assert_eq!(
        copies,
        shipped_definition_files(),
        "run deploy/k8s/sync-observability.sh"
    );
    let k = read("deploy/k8s/base/kustomization.yaml");
    for f in &copies {
        assert_eq!(
            read(&format!("processes/{f}")),
            read(&format!("deploy/k8s/base/config/processes/{f}")),
            "{f}: run deploy/k8s/sync-observability.sh"
        );
        assert!(
            k.contains(&format!("config/processes/{f}")),
            "{f} not in process-config"
        );
    }
    // Dashboard, scripts and the Redis ACL template: byte-identical.
    for (src, copy) in [
        (
            "deploy/scripts/render-redis-acl.sh",
            "deploy/k8s/base/scripts/render-redis-acl.sh",
        ),
        (
            "deploy/redis/users.acl.template",
            "deploy/k8s/base/redis/users.acl.template",
        ),
        (
            "deploy/grafana/honua-process-framework.json",
            "deploy/k8s/base/observability/honua-process-framework.json",
        ),
        (
            "deploy/scripts/backup-redis.sh",
            "deploy/k8s/base/scripts/backup-redis.sh",
        ),
        (
            "deploy/scripts/restore-redis.sh",
            "deploy/k8s/base/scripts/restore-redis.sh",
        ),
    ] {
        assert!(
            read(src) == read(copy),
            "{copy} differs from {src}: run deploy/k8s/sync-observability.sh"
        );
    }
    // PrometheusRule: its spec is the rules file.
    let rules = &docs("deploy/prometheus/rules.yml")[0];
    let pr = &docs("deploy/k8s/base/observability/prometheusrule.yaml")[0];
    assert_eq!(pr["kind"], "PrometheusRule");
    assert!(
        &pr["spec"] == rules,
        "prometheusrule.yaml differs from deploy/prometheus/rules.yml: run deploy/k8s/sync-observability.sh"
    );
}

#[test]
fn autoscaling_and_monitoring_use_exported_metrics_and_the_real_stream() {
    let objs = base_objects();
    let keys = Keys::new(&Config::default().key_prefix, 0);
    let jobs = keys.jobs();
    let stream_label = jobs.as_str().rsplit(':').next().unwrap();

    let hpa = find(&objs, "HorizontalPodAutoscaler", "honua-process-framework");
    assert_eq!(hpa["apiVersion"], "autoscaling/v2");
    assert_eq!(
        hpa["spec"]["scaleTargetRef"]["name"],
        "honua-process-framework"
    );
    let mut resources = BTreeSet::new();
    let mut external = 0;
    for metric in hpa["spec"]["metrics"].as_array().unwrap() {
        match metric["type"].as_str().unwrap() {
            "Resource" => {
                let r = &metric["resource"];
                let want = if r["name"] == "cpu" { 70 } else { 80 };
                assert_eq!(r["target"]["averageUtilization"], want, "{r}");
                resources.insert(r["name"].as_str().unwrap().to_string());
            }
            kind @ ("External" | "Pods") => {
                let spec = &metric[if kind == "External" {
                    "external"
                } else {
                    "pods"
                }];
                let name = spec["metric"]["name"].as_str().unwrap();
                assert!(
                    m::ALL.contains(&name),
                    "{name} is not exported (metrics::ALL)"
                );
                assert_eq!(name, m::QUEUE_LAG);
                assert_eq!(
                    spec["metric"]["selector"]["matchLabels"]["stream"],
                    stream_label
                );
                assert_eq!(spec["target"]["type"], "AverageValue");
                external += 1;
            }
            other => panic!("unexpected HPA metric type {other}"),
        }
    }
    assert_eq!(resources, ["cpu", "memory"].map(String::from).into());
    assert_eq!(external, 1);
    let down = hpa["spec"]["behavior"]["scaleDown"]["stabilizationWindowSeconds"]
        .as_u64()
        .unwrap();
    assert!(down >= 600, "scale-down stabilisation {down}s < 10 min");

    let so = find(&objs, "ScaledObject", "honua-process-framework");
    assert_eq!(
        so["spec"]["scaleTargetRef"]["name"],
        "honua-process-framework"
    );
    let t = so["spec"]["triggers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["type"] == "redis-streams")
        .expect("a redis-streams trigger");
    assert_eq!(t["metadata"]["stream"], jobs.as_str());
    assert_eq!(t["metadata"]["consumerGroup"], WORKERS_GROUP);
    assert!(t["metadata"]["lagCount"].is_string());
    assert!(t["metadata"]["pendingEntriesCount"].is_null());
    let so_down = so["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"]
        ["stabilizationWindowSeconds"]
        .as_u64()
        .unwrap();
    assert!(so_down >= 600);
    let auth = find(&objs, "TriggerAuthentication", "honua-redis");
    assert_eq!(auth["spec"]["secretTargetRef"][0]["name"], "redis-secret");

    // Scrape targets: the gateway Service's port and the workers' metrics port, /metrics.
    let sm = find(&objs, "ServiceMonitor", "honua-process-framework");
    assert_eq!(sm["spec"]["endpoints"][0]["port"], "http");
    assert_eq!(sm["spec"]["endpoints"][0]["path"], "/metrics");
    assert!(read("scheduler/src/gateway/mod.rs").contains(".route(\"/metrics\""));
    let pm = find(&objs, "PodMonitor", "honua-worker");
    assert_eq!(pm["spec"]["podMetricsEndpoints"][0]["port"], "metrics");
    // Alert and recording expressions only name exported metrics (or recorded series).
    let pr = find(&objs, "PrometheusRule", "honua-process-framework");
    let mut recorded = BTreeSet::new();
    for g in pr["spec"]["groups"].as_array().unwrap() {
        for r in g["rules"].as_array().unwrap() {
            if let Some(rec) = r["record"].as_str() {
                recorded.insert(rec.to_string());
            }
        }
    }
    for g in pr["spec"]["groups"].as_array().unwrap() {
        for r in g["rules"].as_array().unwrap() {
            let expr = r["expr"].as_str().unwrap();
            for word in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':')) {
                if word.starts_with("honua_") || word == "redis_up" {
                    let base = word
                        .trim_end_matches("_bucket")
                        .trim_end_matches("_sum")
                        .trim_end_matches("_count");
                    assert!(
                        m::ALL.contains(&word) || m::ALL.contains(&base) || recorded.contains(word),
                        "{word} in {expr} is not exported"
                    );
                }
            }
        }
    }
}

#[test]
fn pods_are_locked_down_and_secrets_only_referenced() {
    let objs = base_objects();
    assert!(
        objs.iter().all(|o| o["kind"] != "Secret"),
        "no Secret objects"
    );
    let ns = find(&objs, "Namespace", "honua-process-framework");
    assert_eq!(ns["kind"], "Namespace");
    assert_eq!(
        docs("deploy/k8s/base/kustomization.yaml")[0]["namespace"],
        "honua-process-framework"
    );
    for w in workloads(&objs) {
        let name = w["metadata"]["name"].as_str().unwrap();
        let ps = pod_spec(w);
        assert_eq!(ps["securityContext"]["runAsNonRoot"], true, "{name}");
        let mut all = ps["containers"].as_array().unwrap().clone();
        all.extend(ps["initContainers"].as_array().cloned().unwrap_or_default());
        for c in &all {
            let cn = c["name"].as_str().unwrap();
            let sc = &c["securityContext"];
            assert_eq!(sc["allowPrivilegeEscalation"], false, "{name}/{cn}");
            assert_eq!(sc["readOnlyRootFilesystem"], true, "{name}/{cn}");
            assert_eq!(
                sc["capabilities"]["drop"],
                serde_json::json!(["ALL"]),
                "{name}/{cn}"
            );
            assert!(
                c["resources"]["requests"]["memory"].is_string(),
                "{name}/{cn}"
            );
            assert!(
                c["resources"]["limits"]["memory"].is_string(),
                "{name}/{cn}"
            );
            let image = c["image"].as_str().unwrap();
            let tag = image.rsplit_once(':').map(|(_, t)| t).unwrap_or("");
            assert!(
                !tag.is_empty() && tag != "latest",
                "{name}/{cn}: pin {image}"
            );
        }
    }
    for pdb in [
        "honua-process-framework-scheduler",
        "honua-process-framework-worker",
    ] {
        find(&objs, "PodDisruptionBudget", pdb);
    }
    // Worker egress: Redis, DNS, HTTPS (LLM), OTLP, nothing else.
    let np = find(&objs, "NetworkPolicy", "honua-worker");
    let mut ports = BTreeSet::new();
    for rule in np["spec"]["egress"].as_array().unwrap() {
        for p in rule["ports"].as_array().unwrap() {
            ports.insert(p["port"].as_u64().unwrap());
        }
    }
    assert_eq!(ports, [53, 443, 4317, 4318, 6379].into());
}

#[test]
fn redis_is_durable_never_evicts_and_is_backed_up_as_the_guide_says() {
    let objs = base_objects();
    let sts = find(&objs, "StatefulSet", "redis");
    assert_eq!(sts["spec"]["replicas"], 1, "one pod: redis-0");
    assert!(
        sts["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"]
            .is_string()
    );
    let conf = read("deploy/k8s/base/redis/redis.conf");
    let directives: Vec<&str> = conf
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    for want in [
        "appendonly yes",
        "appendfsync everysec",
        "maxmemory-policy noeviction",
        "save 900 1",
        "dir /data",
        "dbfilename dump.rdb",
    ] {
        assert!(directives.contains(&want), "redis.conf lacks `{want}`");
    }
    let init = &pod_spec(sts)["initContainers"][0];
    assert!(
        init["command"][2]
            .as_str()
            .unwrap()
            .contains("/scripts/restore-redis.sh")
    );

    let cj = find(&objs, "CronJob", "redis-backup");
    let c = &pod_spec(cj)["containers"][0];
    assert_eq!(
        c["command"],
        serde_json::json!(["/bin/bash", "/scripts/backup-redis.sh"])
    );
    assert_eq!(env_value(c, "BACKUP_KEEP_DAYS").unwrap()["value"], "7");
    assert!(env_value(c, "BACKUP_UPLOAD_COMMAND").is_some());
    let url = env_value(c, "REDIS_URL").unwrap();
    assert_eq!(
        url["valueFrom"]["secretKeyRef"]["key"],
        "backup-connection-string"
    );
    let vols = pod_spec(cj)["volumes"].as_array().unwrap();
    assert!(
        vols.iter()
            .any(|v| v["configMap"]["name"] == "backup-scripts")
    );
    assert!(
        vols.iter()
            .any(|v| v["persistentVolumeClaim"]["claimName"] == "backup-pvc")
    );
    let script = read("deploy/scripts/backup-redis.sh");
    for step in [
        "BGSAVE",
        "LASTSAVE",
        "--rdb",
        "-mtime +\"$keep_days\"",
        "BACKUP_UPLOAD_COMMAND",
    ] {
        assert!(script.contains(step), "backup-redis.sh lacks {step}");
    }
}

/// The users of the ACL template, joined as the renderer joins them: (name, rule words).
fn acl_users() -> Vec<(String, Vec<String>)> {
    let mut users = Vec::new();
    let mut acc = String::new();
    for line in read("deploy/redis/users.acl.template").lines() {
        let t = line.trim();
        if acc.is_empty() && (t.is_empty() || t.starts_with('#')) {
            continue;
        }
        if let Some(head) = t.strip_suffix('\\') {
            acc.push_str(head);
            acc.push(' ');
            continue;
        }
        acc.push_str(t);
        let words: Vec<String> = acc.split_whitespace().map(String::from).collect();
        assert_eq!(words[0], "user", "{acc}");
        users.push((words[1].clone(), words[2..].to_vec()));
        acc.clear();
    }
    users
}

/// Every secretKeyRef (secret name, key) of a container's env.
fn secret_refs(c: &Value) -> Vec<(String, String, String)> {
    c["env"]
        .as_array()
        .map(|env| {
            env.iter()
                .filter(|e| e["valueFrom"]["secretKeyRef"].is_object())
                .map(|e| {
                    let r = &e["valueFrom"]["secretKeyRef"];
                    (
                        e["name"].as_str().unwrap().to_string(),
                        r["name"].as_str().unwrap().to_string(),
                        r["key"].as_str().unwrap().to_string(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn redis_acl_users_per_role_are_rendered_from_secrets_and_each_is_used() {
    let objs = base_objects();
    let users = acl_users();
    let names: Vec<&str> = users.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names[0], "default");
    let default_rules = &users[0].1;
    assert!(
        default_rules.contains(&"off".into()) && !default_rules.contains(&"on".into()),
        "default must be off: {default_rules:?}"
    );

    // redis.conf loads the rendered file; no password in the config or on the command line.
    let conf = read("deploy/k8s/base/redis/redis.conf");
    assert!(
        conf.lines()
            .any(|l| l.trim() == "aclfile /etc/redis-acl/users.acl"),
        "redis.conf lacks the aclfile"
    );
    assert!(
        !conf
            .lines()
            .any(|l| l.trim_start().starts_with("requirepass")),
        "requirepass"
    );
    let sts = find(&objs, "StatefulSet", "redis");
    let redis = container(sts, "redis");
    assert!(
        !redis["command"].to_string().contains("requirepass"),
        "{}",
        redis["command"]
    );
    // The `acl` init container renders it from redis-secret: one <role>-password per user.
    let init = pod_spec(sts)["initContainers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "acl")
        .expect("the acl init container");
    assert_eq!(init["command"][1], "/scripts/render-redis-acl.sh");
    assert!(init["command"][3].as_str().unwrap().ends_with("/users.acl"));
    let rendered_from: BTreeSet<(String, String)> = secret_refs(init)
        .into_iter()
        .map(|(env, secret, key)| {
            assert_eq!(secret, "redis-secret");
            (env, key)
        })
        .collect();
    assert_eq!(
        env_value(init, "HONUA_KEY_PREFIX").unwrap()["value"],
        Config::default().key_prefix.as_str()
    );

    // Who logs in as whom: every user of the template is someone's.
    let mut used_by: std::collections::BTreeMap<String, Vec<String>> = Default::default();
    for w in workloads(&objs) {
        let ps = pod_spec(w);
        for c in ps["containers"].as_array().unwrap() {
            for (env, _, key) in secret_refs(c) {
                let who = format!("{}/{}", w["metadata"]["name"].as_str().unwrap(), c["name"]);
                if let Some(role) = key.strip_suffix("-connection-string") {
                    used_by
                        .entry(format!("honua-{role}"))
                        .or_default()
                        .push(who);
                } else if env == "REDISCLI_AUTH" && key == "admin-password" {
                    // redis-0's redis-cli wrapper logs in as honua-admin.
                    used_by.entry("honua-admin".into()).or_default().push(who);
                }
            }
        }
    }
    let auth = find(&objs, "TriggerAuthentication", "honua-redis");
    let so = find(&objs, "ScaledObject", "honua-process-framework");
    let trigger = so["spec"]["triggers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["type"] == "redis-streams")
        .unwrap();
    let keda_user = trigger["metadata"]["username"].as_str().unwrap();
    let keda_key = auth["spec"]["secretTargetRef"][0]["key"].as_str().unwrap();
    assert_eq!(
        keda_user.strip_prefix("honua-"),
        keda_key.strip_suffix("-password")
    );
    used_by
        .entry(keda_user.into())
        .or_default()
        .push("ScaledObject/honua-process-framework".into());

    let wrapper = read("deploy/k8s/base/redis/redis-cli");
    assert!(wrapper.contains("honua-admin"));
    for (name, rules) in users.iter().skip(1) {
        let role = name
            .strip_prefix("honua-")
            .unwrap_or_else(|| panic!("user {name}: name roles honua-<role>"));
        assert!(
            used_by.contains_key(name),
            "user {name} is in the ACL template but no workload logs in as it: {used_by:?}"
        );
        // Its password comes from the secret, as a placeholder the renderer hashes.
        let var = format!("REDIS_PASSWORD_{}", role.to_uppercase().replace('-', "_"));
        assert!(
            rendered_from.contains(&(var.clone(), format!("{role}-password"))),
            "{name}: the acl init container needs {var} from redis-secret/{role}-password"
        );
        assert!(rules.contains(&"@password@".into()), "{name}: {rules:?}");
        for r in rules {
            assert!(
                !r.starts_with('>') && !r.starts_with('#') && r != "nopass",
                "{name}: a password value is committed: {r}"
            );
        }
        if name == "honua-admin" {
            continue;
        }
        // Least privilege: the prefix only, an explicit allow-list, nothing dangerous.
        // Selectors, `(+command ~pattern)`, are split over words: their parentheses go.
        assert!(rules.contains(&"-@all".into()), "{name}: start from -@all");
        assert!(rules.contains(&"resetkeys".into()), "{name}: resetkeys");
        for r in rules {
            let lower = r
                .trim_start_matches('(')
                .trim_end_matches(')')
                .to_ascii_lowercase();
            if let Some((_, pattern)) = lower.split_once('~') {
                assert!(
                    pattern.starts_with("@prefix@:"),
                    "{name}: key pattern {r} (only under ~@prefix@:)"
                );
            }
            assert!(
                ![
                    "allkeys",
                    "allcommands",
                    "+@all",
                    "+@admin",
                    "+@dangerous",
                    "&*",
                    "allchannels"
                ]
                .contains(&lower.as_str()),
                "{name}: {r}"
            );
            for bad in [
                "flushall",
                "flushdb",
                "config",
                "keys",
                "scan",
                "debug",
                "shutdown",
                "module",
                "acl",
                "monitor",
                "eval",
                "eval_ro",
                "evalsha",
                "evalsha_ro",
                "script",
                "function|flush",
                "function|delete",
                "function|restore",
            ] {
                assert!(
                    lower != format!("+{bad}") && !lower.starts_with(&format!("+{bad}|")),
                    "{name}: {r}"
                );
            }
        }
    }
    // Every role user is one the README tells operators to create a password for.
    let readme = read("deploy/k8s/README.md");
    for (name, _) in users.iter().skip(1) {
        let role = name.strip_prefix("honua-").unwrap();
        assert!(
            readme.contains(&format!("{role}-password")),
            "deploy/k8s/README.md: no {role}-password in the secret instructions"
        );
    }

    // No secret values anywhere in the manifests: every env var that looks like a
    // credential comes from a secretKeyRef.
    for w in workloads(&objs) {
        let ps = pod_spec(w);
        let mut all = ps["containers"].as_array().unwrap().clone();
        all.extend(ps["initContainers"].as_array().cloned().unwrap_or_default());
        for c in &all {
            for e in c["env"].as_array().cloned().unwrap_or_default() {
                let n = e["name"].as_str().unwrap();
                if n.contains("PASSWORD")
                    || n.contains("AUTH")
                    || n.ends_with("_URL")
                    || n.ends_with("_KEY")
                    || n.ends_with("_KEYS")
                {
                    assert!(
                        e["value"].is_null() && e["valueFrom"]["secretKeyRef"].is_object(),
                        "{}/{}: {n} must come from a secret",
                        w["metadata"]["name"],
                        c["name"]
                    );
                }
            }
        }
    }
}

/// The API is open without keys (the base keeps the secret optional, for trials): every
/// prod overlay must make the `honua-api-keys` secret required, so a prod scheduler does
/// not start without it. `deploy/k8s/validate.sh` checks the same on the rendered overlays.
#[test]
fn prod_overlays_require_the_api_keys_secret() {
    let base = find(
        &base_objects(),
        "Deployment",
        "honua-process-framework-scheduler",
    )
    .clone();
    let keys = |c: &Value| env_value(c, "HONUA_API_KEYS").cloned();
    let base_ref = keys(container(&base, "scheduler")).expect("HONUA_API_KEYS in the base");
    assert_eq!(
        base_ref["valueFrom"]["secretKeyRef"]["name"],
        "honua-api-keys"
    );

    let prod = &docs("deploy/k8s/overlays/prod/kustomization.yaml")[0];
    let patched = prod["patches"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| p["patch"].as_str())
        .filter_map(|text| serde_yaml_ng::from_str::<Value>(text).ok())
        .find(|p| {
            p["kind"] == "Deployment"
                && p["metadata"]["name"] == "honua-process-framework-scheduler"
        })
        .expect("the prod overlay patches the scheduler Deployment");
    let r = keys(container(&patched, "scheduler")).expect("the patch sets HONUA_API_KEYS");
    let secret = &r["valueFrom"]["secretKeyRef"];
    assert_eq!(
        secret["name"],
        base_ref["valueFrom"]["secretKeyRef"]["name"]
    );
    assert_eq!(secret["key"], base_ref["valueFrom"]["secretKeyRef"]["key"]);
    assert_eq!(secret["optional"], false, "{r}");
    // prod-keda builds on prod, so it inherits the patch.
    let keda = &docs("deploy/k8s/overlays/prod-keda/kustomization.yaml")[0];
    assert!(
        keda["resources"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r == "../prod"),
        "{keda}"
    );
}

/// The KEDA component of a partitioned deployment on a Redis Cluster: one
/// redis-cluster-streams trigger per partition on that partition's job stream (the keys the
/// code builds), all of them summed by the scaling formula, as many as the HONUA_PARTITIONS
/// it sets on both Deployments; the file is what generate.sh writes; the overlay using it
/// builds on prod and replaces HONUA_REDIS_URL with HONUA_REDIS_CLUSTER_NODES.
#[test]
fn keda_on_a_cluster_sums_the_lag_of_every_partition() {
    let dir = "deploy/k8s/components/keda-cluster";
    let objs = docs(&format!("{dir}/scaledobject.yaml"));
    let so = find(&objs, "ScaledObject", "honua-process-framework");
    let triggers = so["spec"]["triggers"].as_array().unwrap();
    let comp = &docs(&format!("{dir}/kustomization.yaml"))[0];
    let partitions: Vec<u16> = comp["patches"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| p["patch"].as_str())
        .filter_map(|text| serde_yaml_ng::from_str::<Value>(text).ok())
        .filter(|p| p["kind"] == "Deployment")
        .map(|d| {
            let c = &pod_spec(&d)["containers"][0];
            let v = env_value(c, "HONUA_PARTITIONS").expect("HONUA_PARTITIONS set");
            v["value"].as_str().unwrap().parse().unwrap()
        })
        .collect();
    assert_eq!(partitions.len(), 2, "both Deployments: {comp}");
    assert!(partitions.iter().all(|&p| usize::from(p) == triggers.len()));
    let cfg = Config {
        partitions: partitions[0],
        ..Config::default()
    };
    cfg.validate().unwrap();
    let keys = Keys::new(&cfg.key_prefix, 0);
    let formula = so["spec"]["advanced"]["scalingModifiers"]["formula"]
        .as_str()
        .unwrap();
    let terms: BTreeSet<&str> = formula.split('+').map(str::trim).collect();
    for (p, t) in triggers.iter().enumerate() {
        assert_eq!(t["type"], "redis-cluster-streams");
        assert_eq!(
            t["metadata"]["stream"],
            keys.in_shard(p as u16).jobs().as_str()
        );
        assert_eq!(t["metadata"]["consumerGroup"], WORKERS_GROUP);
        assert!(t["metadata"]["lagCount"].is_string());
        assert!(terms.contains(t["name"].as_str().unwrap()), "{formula}");
    }
    assert_eq!(terms.len(), triggers.len(), "{formula}");
    // The checked-in file is generate.sh's output for this P.
    if std::process::Command::new("bash")
        .arg("--version")
        .output()
        .is_ok()
    {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::copy(
            root().join(format!("{dir}/generate.sh")),
            tmp.path().join("generate.sh"),
        )
        .unwrap();
        let out = std::process::Command::new("bash")
            .arg(tmp.path().join("generate.sh"))
            .arg(partitions[0].to_string())
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        assert!(
            std::fs::read_to_string(tmp.path().join("scaledobject.yaml")).unwrap()
                == read(&format!("{dir}/scaledobject.yaml")),
            "{dir}/scaledobject.yaml differs from generate.sh {}: regenerate it",
            partitions[0]
        );
    }
    let overlay = &docs("deploy/k8s/overlays/prod-keda-cluster/kustomization.yaml")[0];
    assert_eq!(overlay["resources"][0], "../prod", "{overlay}");
    let text = read("deploy/k8s/overlays/prod-keda-cluster/kustomization.yaml");
    assert!(text.contains("HONUA_REDIS_CLUSTER_NODES") && text.contains("$patch: delete"));
    assert!(ENV_VARS.contains(&"HONUA_PARTITIONS"));
}

/// The `path = "…"` entries of a clippy.toml's disallowed lists.
fn disallowed_paths(rel: &str) -> BTreeSet<String> {
    read(rel)
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .filter_map(|l| l.split("path = \"").nth(1))
        .filter_map(|rest| rest.split('"').next())
        .map(str::to_string)
        .collect()
}

/// Clippy reads the nearest clippy.toml only, so a crate with its own (the protocol crate's
/// stricter one) must repeat every entry of the workspace policy, or that crate silently
/// escapes it.
#[test]
fn shared_clippy_policy_extends_the_workspace_policy() {
    let workspace = disallowed_paths("clippy.toml");
    assert!(
        workspace.contains("redis::AsyncCommands::xack") && workspace.len() >= 10,
        "{workspace:?}"
    );
    let shared = disallowed_paths("shared/clippy.toml");
    let missing: Vec<_> = workspace.difference(&shared).collect();
    assert!(missing.is_empty(), "shared/clippy.toml lacks {missing:?}");
    assert!(shared.contains("std::time::Instant::now"), "{shared:?}");
    // No other crate has a policy file of its own that could drift.
    for member in [
        "runtime",
        "scheduler",
        "worker",
        "cli",
        "mockllm",
        "loadtest",
        "tests",
    ] {
        assert!(
            !root().join(member).join("clippy.toml").exists(),
            "{member}/clippy.toml would replace the workspace policy for {member}"
        );
    }
}
