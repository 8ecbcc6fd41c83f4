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
        for (path, format) in files {
            let text = std::fs::read_to_string(&path).map_err(io(&path))?;
            let source = path.display().to_string();
            let def = ProcessDefinition::parse(&text, format, &source, kinds)?;
            set.insert(def, &source)?;
        }
        Ok(set)
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
        let def = Arc::new(def);
        self.defs
            .entry(key.0.clone())
            .or_default()
            .insert(key.1, def.clone());
        self.sources.insert(key, source.to_string());
        Ok(def)
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

    fn shipped() -> DefinitionSet {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../processes");
        DefinitionSet::load_dir(&dir, &KindRegistry::builtin()).unwrap()
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
            ["ValidateGitConfig", "SyncConfig", "MonitorDrift"]
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
        let kinds = KindRegistry::builtin();
        for d in set.iter() {
            for s in &d.steps {
                assert!(kinds.executor(&s.kind).is_some(), "{} {}", d.name, s.name);
            }
        }
        assert_eq!(kinds.executor(&review.kind), Some(Executor::Scheduler));
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
