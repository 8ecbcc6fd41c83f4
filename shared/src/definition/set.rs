//! The loaded process types, by name and version.

use super::{DefinitionError, Format, KindRegistry, ProcessDefinition};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

/// Every loaded process type, by name then version.
#[derive(Debug, Clone, Default)]
pub struct DefinitionSet {
    defs: BTreeMap<String, BTreeMap<u32, Arc<ProcessDefinition>>>,
    /// Where each (name, version) came from, for the duplicate error.
    sources: BTreeMap<(String, u32), String>,
    /// Names of steps that route anywhere in some definition (a hint for workers: only
    /// such a step's result can enqueue its successors itself).
    routing: std::collections::BTreeSet<String>,
}

impl DefinitionSet {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Loads every `*.toml`, `*.yaml` and `*.yml` file directly in `dir` (not hidden
    /// files, not subdirectories), in name order. Fails on the first invalid file, on a
    /// (name, version) defined twice and when there is no file at all.
    pub fn load_dir(dir: &Path, kinds: &KindRegistry) -> Result<DefinitionSet, DefinitionError> {
        Self::load_dir_skipping(dir, kinds, |_| false).map(|(set, _)| set)
    }

    /// As [`Self::load_dir`], but a file rejected only because it has an `llm` step and
    /// the config no `[llm_provider]` ([`DefinitionError::NeedsLlmProvider`]) is left out
    /// and returned with the set (`honua dev` without a provider runs the rest). Every
    /// other error still fails the load, and so does a directory left with no definition.
    pub fn load_dir_without_llm(
        dir: &Path,
        kinds: &KindRegistry,
    ) -> Result<(DefinitionSet, Vec<DefinitionError>), DefinitionError> {
        let (set, mut skipped) = Self::load_dir_skipping(dir, kinds, |e| {
            matches!(e, DefinitionError::NeedsLlmProvider { .. })
        })?;
        if set.is_empty() && !skipped.is_empty() {
            return Err(skipped.swap_remove(0));
        }
        Ok((set, skipped))
    }

    fn load_dir_skipping(
        dir: &Path,
        kinds: &KindRegistry,
        skip: impl Fn(&DefinitionError) -> bool,
    ) -> Result<(DefinitionSet, Vec<DefinitionError>), DefinitionError> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| DefinitionError::Io { path, source }
        };
        let mut files = Vec::new();
        for entry in std::fs::read_dir(dir).map_err(io(dir))? {
            let path = entry.map_err(io(dir))?.path();
            let hidden = path
                .file_name()
                .and_then(|n| n.to_str())
                .is_none_or(|n| n.starts_with('.'));
            if let Some(format) = Format::from_path(&path)
                && !hidden
                && path.is_file()
            {
                files.push((path, format));
            }
        }
        if files.is_empty() {
            return Err(DefinitionError::EmptyDir {
                dir: dir.to_path_buf(),
            });
        }
        files.sort_by(|a, b| a.0.cmp(&b.0));
        let mut set = Self::new();
        let mut skipped = Vec::new();
        for (path, format) in files {
            let text = std::fs::read_to_string(&path).map_err(io(&path))?;
            let source = path.display().to_string();
            match ProcessDefinition::parse(&text, format, &source, kinds) {
                Ok(def) => {
                    set.insert(def, &source)?;
                }
                Err(e) if skip(&e) => skipped.push(e),
                Err(e) => return Err(e),
            }
        }
        Ok((set, skipped))
    }

    /// A set holding the one definition in `text`; `source` names it in errors.
    pub fn from_str(
        text: &str,
        format: Format,
        source: &str,
        kinds: &KindRegistry,
    ) -> Result<DefinitionSet, DefinitionError> {
        let mut set = Self::new();
        set.insert(
            ProcessDefinition::parse(text, format, source, kinds)?,
            source,
        )?;
        Ok(set)
    }

    /// Adds `def`, loaded from `source`; a (name, version) already present is an error.
    pub fn insert(
        &mut self,
        def: ProcessDefinition,
        source: &str,
    ) -> Result<Arc<ProcessDefinition>, DefinitionError> {
        let key = (def.name.clone(), def.version);
        if let Some(first) = self.sources.get(&key) {
            return Err(DefinitionError::DuplicateDefinition {
                name: key.0,
                version: key.1,
                first: first.clone(),
                second: source.to_string(),
            });
        }
        for step in &def.steps {
            if !step.routes.is_empty() {
                self.routing.insert(step.name.clone());
            }
        }
        let def = Arc::new(def);
        self.defs
            .entry(key.0.clone())
            .or_default()
            .insert(key.1, def.clone());
        self.sources.insert(key, source.to_string());
        Ok(def)
    }

    /// `true` when a step named `step` routes to another step in some loaded definition:
    /// its worker asks `begin.lua` for the process's step records, so that it can commit
    /// the step's successors with its result ([`crate::commit::FastCommit`]).
    pub fn may_route(&self, step: &str) -> bool {
        self.routing.contains(step)
    }

    /// Version `version` of process type `name`.
    pub fn get(&self, name: &str, version: u32) -> Option<&Arc<ProcessDefinition>> {
        self.defs.get(name)?.get(&version)
    }

    /// The highest version of process type `name`.
    pub fn latest(&self, name: &str) -> Option<&Arc<ProcessDefinition>> {
        self.defs.get(name)?.values().next_back()
    }

    /// Every definition, by name then version.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<ProcessDefinition>> {
        self.defs.values().flat_map(|versions| versions.values())
    }

    /// The process type names, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.defs.keys().map(String::as_str)
    }

    /// How many (name, version) definitions there are.
    pub fn len(&self) -> usize {
        self.sources.len()
    }

    pub fn is_empty(&self) -> bool {
        self.sources.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::definition::{Executor, Join};
    use std::path::PathBuf;
    use std::time::Duration;

    fn shipped_dir() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../processes")
    }

    /// The kinds of a deployment with an `[llm_provider]`.
    fn with_llm() -> KindRegistry {
        KindRegistry::for_config(&crate::config::Config {
            llm_provider: Some(Default::default()),
            ..Default::default()
        })
    }

    fn shipped() -> DefinitionSet {
        DefinitionSet::load_dir(&shipped_dir(), &with_llm()).unwrap()
    }

    /// A fresh directory under the system temp dir, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(name: &str) -> Self {
            let dir = std::env::temp_dir()
                .join(format!("honua-definition-{}-{name}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            Self(dir)
        }

        fn write(&self, file: &str, text: &str) {
            std::fs::write(self.0.join(file), text).unwrap();
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn one_step(name: &str, version: u32) -> String {
        format!(
            "name = \"{name}\"\nversion = {version}\n[[steps]]\nname = \"S\"\nkind = \"noop\"\n"
        )
    }

    #[test]
    fn shipped_definitions_load() {
        let set = shipped();
        assert_eq!(
            set.names().collect::<Vec<_>>(),
            [
                "Benchmark",
                "Deployment",
                "GitOps",
                "Metadata",
                "Test",
                "Upgrade"
            ]
        );
        assert_eq!(set.len(), 6);
        let sequence = |name: &str| -> Vec<String> {
            let d = set.latest(name).unwrap();
            let mut order = d.start.clone();
            while let [.., last] = order.as_slice() {
                match d.targets(last, "ok") {
                    [next] if !order.contains(next) => order.push(next.clone()),
                    _ => break,
                }
            }
            assert_eq!(order.len(), d.steps.len(), "{name}");
            order
        };
        assert_eq!(
            sequence("Deployment"),
            [
                "ValidateDeploymentRequirements",
                "GenerateInfrastructureCode",
                "ReviewInfrastructure",
                "DeployInfrastructure",
                "ConfigureServices",
                "DeployApplication",
                "ValidateDeployment",
                "ConfigureObservability"
            ]
        );
        assert_eq!(
            sequence("Upgrade"),
            [
                "DetectCurrentVersion",
                "PlanUpgrade",
                "BackupDatabase",
                "CreateBlueEnvironment",
                "SwitchTraffic"
            ]
        );
        assert_eq!(
            sequence("Metadata"),
            ["ExtractMetadata", "GenerateStacItem", "PublishStac"]
        );
        assert_eq!(
            sequence("GitOps"),
            [
                "ValidateGitConfig",
                "SummarizeDiff",
                "SyncConfig",
                "MonitorDrift"
            ]
        );
        assert_eq!(
            sequence("Benchmark"),
            [
                "SetupBenchmark",
                "RunBenchmark",
                "AnalyzeResults",
                "GenerateReport"
            ]
        );

        let dep = set.get("Deployment", 1).unwrap();
        assert_eq!(dep.timeout, Some(Duration::from_secs(3 * 3600)));
        assert_eq!(
            set.latest("Upgrade").unwrap().timeout,
            Some(Duration::from_secs(4 * 3600))
        );
        let review = dep.step("ReviewInfrastructure").unwrap();
        assert_eq!(review.kind, "approval");
        assert_eq!(review.config["signal"], "review");
        assert_eq!(
            dep.targets("ReviewInfrastructure", "rejected"),
            ["GenerateInfrastructureCode"]
        );
        let generate = dep.step("GenerateInfrastructureCode").unwrap();
        assert_eq!(generate.max_visits, Some(3));
        assert_eq!(generate.join, Join::Any);
        assert_eq!(
            dep.inbound("GenerateInfrastructureCode"),
            ["ValidateDeploymentRequirements", "ReviewInfrastructure"]
        );
        let kinds = with_llm();
        for d in set.iter() {
            for s in &d.steps {
                assert!(kinds.executor(&s.kind).is_some(), "{} {}", d.name, s.name);
            }
        }
        assert_eq!(kinds.executor(&review.kind), Some(Executor::Scheduler));

        // The steps that generate or analyse are `llm` steps choosing their model by task
        // class, each with an output schema.
        let llm_steps: Vec<(String, String, String)> = set
            .iter()
            .flat_map(|d| d.steps.iter().map(move |s| (d, s)))
            .filter(|(_, s)| s.kind == crate::definition::LLM_KIND)
            .map(|(d, s)| {
                let spec = crate::definition::llm::parse_spec(&s.config).unwrap();
                assert!(
                    spec.model.is_none(),
                    "{} {}: task_class, not model",
                    d.name,
                    s.name
                );
                assert!(spec.schema.is_some(), "{} {}: a schema", d.name, s.name);
                (
                    d.name.clone(),
                    s.name.clone(),
                    format!("{:?}", spec.task_class),
                )
            })
            .collect();
        let want = [
            ("Benchmark", "AnalyzeResults", "ComplexTask"),
            ("Benchmark", "GenerateReport", "SimpleTask"),
            ("Deployment", "ValidateDeploymentRequirements", "SimpleTask"),
            ("Deployment", "GenerateInfrastructureCode", "CodeGeneration"),
            ("GitOps", "SummarizeDiff", "SimpleTask"),
            ("Metadata", "ExtractMetadata", "ComplexTask"),
            ("Metadata", "GenerateStacItem", "SimpleTask"),
            ("Upgrade", "PlanUpgrade", "ComplexTask"),
        ]
        .map(|(a, b, c)| (a.to_string(), b.to_string(), c.to_string()));
        assert_eq!(llm_steps, want);
    }

    #[test]
    fn without_an_llm_provider_the_llm_types_name_the_missing_config() {
        let e = DefinitionSet::load_dir(&shipped_dir(), &KindRegistry::builtin()).unwrap_err();
        let DefinitionError::NeedsLlmProvider { process, step, .. } = &e else {
            panic!("{e:?}");
        };
        assert_eq!(
            (process.as_str(), step.as_str()),
            ("Benchmark", "AnalyzeResults")
        );
        let msg = e.to_string();
        assert!(msg.contains("benchmark.toml"), "{msg}");
        assert!(msg.contains("[llm_provider]"), "{msg}");
        assert!(msg.contains("--mock-llm"), "{msg}");

        // Leaving them out keeps the rest: `Test`, and nothing else of the shipped types.
        let (set, skipped) =
            DefinitionSet::load_dir_without_llm(&shipped_dir(), &KindRegistry::builtin()).unwrap();
        assert_eq!(set.names().collect::<Vec<_>>(), ["Test"]);
        let skipped: Vec<&str> = skipped
            .iter()
            .map(|e| match e {
                DefinitionError::NeedsLlmProvider { process, .. } => process.as_str(),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(
            skipped,
            ["Benchmark", "Deployment", "GitOps", "Metadata", "Upgrade"]
        );

        // Other errors still fail the load, and so does a directory with nothing left.
        let dir = TempDir::new("only-llm");
        let llm = "name = \"L\"\nversion = 1\n[[steps]]\nname = \"A\"\nkind = \"llm\"\nconfig = { prompt = \"hi\" }\n";
        std::fs::write(dir.0.join("l.toml"), llm).unwrap();
        let e = DefinitionSet::load_dir_without_llm(&dir.0, &KindRegistry::builtin()).unwrap_err();
        assert!(
            matches!(e, DefinitionError::NeedsLlmProvider { .. }),
            "{e:?}"
        );
        std::fs::write(
            dir.0.join("t.toml"),
            "name = \"T\"\nversion = 1\n[[steps]]\nname = \"S\"\nkind = \"nope\"\n",
        )
        .unwrap();
        let e = DefinitionSet::load_dir_without_llm(&dir.0, &KindRegistry::builtin()).unwrap_err();
        assert!(matches!(e, DefinitionError::UnknownKind { .. }), "{e:?}");
    }

    #[test]
    fn llm_templates_read_only_steps_that_run_before() {
        let def = |prompt: &str| {
            format!(
                "name = \"P\"\nversion = 1\n[[steps]]\nname = \"A\"\nkind = \"llm\"\nconfig = {{ prompt = \"a\" }}\nnext = \"B\"\n[[steps]]\nname = \"B\"\nkind = \"llm\"\nconfig = {{ prompt = \"{prompt}\" }}\nnext = \"C\"\n[[steps]]\nname = \"C\"\nkind = \"noop\"\n"
            )
        };
        let load = |prompt: &str| {
            DefinitionSet::from_str(&def(prompt), Format::Toml, "p.toml", &with_llm())
        };
        load("{{steps.A.text}} {{input.x}}").unwrap();
        for (prompt, read) in [
            ("{{steps.C.text}}", "C"),
            ("{{steps.Typo.json}}", "Typo"),
            ("{{steps.B.text}}", "B"),
        ] {
            let e = load(prompt).unwrap_err();
            assert!(
                matches!(&e, DefinitionError::TemplateStep { step, read: r, .. } if step == "B" && r == read),
                "{prompt}: {e:?}"
            );
            assert!(
                e.to_string().contains("not a step that runs before `B`"),
                "{e}"
            );
        }
    }

    #[test]
    fn test_process_fans_out_and_joins() {
        let set = shipped();
        let t = set.get("Test", 1).unwrap();
        assert_eq!(t.start, ["Start"]);
        assert_eq!(t.targets("Start", "ok"), ["A", "B"]);
        assert_eq!(t.targets("A", "ok"), ["Join"]);
        assert_eq!(t.targets("B", "ok"), ["Join"]);
        assert_eq!(t.targets("Join", "ok"), ["Done"]);
        assert!(t.targets("Done", "ok").is_empty());
        assert!(t.targets("Start", "failed").is_empty());
        assert!(t.targets("Nope", "ok").is_empty());
        assert!(t.inbound("Start").is_empty());
        assert_eq!(t.inbound("A"), ["Start"]);
        assert_eq!(t.inbound("B"), ["Start"]);
        assert_eq!(t.inbound("Join"), ["A", "B"]);
        assert_eq!(t.inbound("Done"), ["Join"]);
        assert_eq!(t.step("Join").unwrap().join, Join::All);
        assert!(t.steps.iter().all(|s| s.kind == "noop"));
    }

    #[test]
    fn load_dir_reads_only_definition_files_in_name_order() {
        let dir = TempDir::new("mixed");
        dir.write("b.toml", &one_step("Alpha", 2));
        dir.write(
            "a.yml",
            "name: Alpha\nversion: 1\nsteps:\n  - { name: S, kind: noop }\n",
        );
        dir.write(
            "c.YAML",
            "name: Beta\nversion: 1\nsteps:\n  - { name: S, kind: noop }\n",
        );
        dir.write("notes.md", "not a definition");
        dir.write(".hidden.toml", "not toml at all [");
        std::fs::create_dir(dir.0.join("sub.toml")).unwrap();
        let set = DefinitionSet::load_dir(&dir.0, &KindRegistry::builtin()).unwrap();
        assert_eq!(set.names().collect::<Vec<_>>(), ["Alpha", "Beta"]);
        assert_eq!(set.len(), 3);
        assert_eq!(set.latest("Alpha").unwrap().version, 2);
        assert_eq!(set.get("Alpha", 1).unwrap().version, 1);
        assert!(set.get("Alpha", 3).is_none());
        assert!(set.latest("Gamma").is_none());
        let all: Vec<(&str, u32)> = set.iter().map(|d| (d.name.as_str(), d.version)).collect();
        assert_eq!(all, [("Alpha", 1), ("Alpha", 2), ("Beta", 1)]);
    }

    #[test]
    fn load_dir_reports_the_bad_file() {
        let dir = TempDir::new("bad");
        dir.write("a.toml", &one_step("Alpha", 1));
        dir.write("b.toml", &one_step("Beta", 1).replace("noop", "mystery"));
        let err = DefinitionSet::load_dir(&dir.0, &KindRegistry::builtin()).unwrap_err();
        assert!(
            matches!(&err, DefinitionError::UnknownKind { file, .. } if file.ends_with("b.toml"))
        );
    }

    #[test]
    fn duplicate_name_and_version_across_files() {
        let dir = TempDir::new("dup");
        dir.write("a.toml", &one_step("Alpha", 1));
        dir.write(
            "b.yaml",
            "name: Alpha\nversion: 1\nsteps:\n  - { name: S, kind: noop }\n",
        );
        let err = DefinitionSet::load_dir(&dir.0, &KindRegistry::builtin()).unwrap_err();
        let DefinitionError::DuplicateDefinition { first, second, .. } = &err else {
            panic!("{err:?}");
        };
        assert!(
            first.ends_with("a.toml") && second.ends_with("b.yaml"),
            "{err}"
        );
    }

    #[test]
    fn empty_or_missing_directory() {
        let dir = TempDir::new("empty");
        dir.write("README.md", "no definitions here");
        let err = DefinitionSet::load_dir(&dir.0, &KindRegistry::builtin()).unwrap_err();
        assert!(matches!(err, DefinitionError::EmptyDir { .. }), "{err:?}");
        let err =
            DefinitionSet::load_dir(&dir.0.join("missing"), &KindRegistry::builtin()).unwrap_err();
        assert!(matches!(err, DefinitionError::Io { .. }), "{err:?}");
    }

    #[test]
    fn from_str_and_insert() {
        let kinds = KindRegistry::builtin();
        let mut set =
            DefinitionSet::from_str(&one_step("Alpha", 1), Format::Toml, "inline", &kinds).unwrap();
        assert_eq!(set.len(), 1);
        assert!(!set.is_empty());
        let again =
            ProcessDefinition::parse(&one_step("Alpha", 1), Format::Toml, "other", &kinds).unwrap();
        assert!(matches!(
            set.insert(again, "other"),
            Err(DefinitionError::DuplicateDefinition { .. })
        ));
        let v2 =
            ProcessDefinition::parse(&one_step("Alpha", 2), Format::Toml, "v2", &kinds).unwrap();
        let inserted = set.insert(v2, "v2").unwrap();
        assert!(Arc::ptr_eq(&inserted, set.latest("Alpha").unwrap()));
        assert!(DefinitionSet::new().is_empty());
        assert!(matches!(
            DefinitionSet::from_str("name = ", Format::Toml, "inline", &kinds),
            Err(DefinitionError::Parse { .. })
        ));
    }
}
