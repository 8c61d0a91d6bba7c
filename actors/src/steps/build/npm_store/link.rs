//! A store entry in a workspace: its `node_modules` made one symlink per top-level name of the
//! entry, beside the build's own caches.

#[allow(clippy::wildcard_imports)] // the store's shared types, paths and helpers
use super::*;

/// Make `modules` (the workspace's `node_modules`) hold exactly one symlink per top-level entry
/// of `store_modules`, plus the build's cache folders. Existing right links stay; anything else
/// (an earlier entry's links, a whole per-workspace install, a package the agent added) goes.
/// Removing a symlink never touches what it points to.
pub(crate) fn link_overlay(store_modules: &Path, modules: &Path) -> std::io::Result<()> {
    let mut wanted: HashMap<std::ffi::OsString, PathBuf> = HashMap::new();
    // A lock file without dependencies installs no `node_modules` at all.
    let listed = match std::fs::read_dir(store_modules) {
        Ok(listed) => listed.collect::<Result<Vec<_>, _>>()?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(e),
    };
    for item in listed {
        let name = item.file_name();
        if CACHE_DIRS.iter().any(|c| OsStr::new(c) == name) {
            continue;
        }
        wanted.insert(name, item.path());
    }
    // The workspace's `node_modules` is the tenant's (its build may run beside this, started
    // ahead): every step is by handle, so a folder swapped for a link is never entered, and
    // nothing outside `node_modules` is removed or linked.
    let tenant = |e: TenantFileError| std::io::Error::other(e.to_string());
    let parent = modules
        .parent()
        .ok_or_else(|| std::io::Error::other("node_modules has no folder"))?;
    let name = modules
        .file_name()
        .ok_or_else(|| std::io::Error::other("node_modules has no name"))?;
    let workspace = DirHandle::open(parent).map_err(tenant)?;
    match workspace.stat(name).map_err(tenant)? {
        Some(stat) if tenant_fs::is_dir(&stat) => {}
        Some(_) => {
            workspace.remove_entry(name).map_err(tenant)?;
            workspace
                .create_dirs(Path::new(name), 0o755, None)
                .map_err(tenant)?;
        }
        None => {
            workspace
                .create_dirs(Path::new(name), 0o755, None)
                .map_err(tenant)?;
        }
    }
    let folder = workspace.open_dir(Path::new(name)).map_err(tenant)?;
    for (name, stat) in folder.entries().map_err(tenant)? {
        if tenant_fs::is_dir(&stat) && CACHE_DIRS.iter().any(|c| OsStr::new(c) == name) {
            continue;
        }
        if tenant_fs::is_link(&stat)
            && let Some(points_to) = folder.link_target(&name)
            && wanted.get(&name) == Some(&points_to)
        {
            wanted.remove(&name);
            continue;
        }
        folder.remove_entry(&name).map_err(tenant)?;
    }
    for (name, target) in wanted {
        folder.make_link(&target, &name).map_err(tenant)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::steps::build::npm_store::install::make_read_only;

    #[test]
    fn the_fingerprint_sees_writes_and_the_overlay_keeps_caches() {
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path().join("entry");
        std::fs::create_dir_all(store.join("node_modules/astro")).unwrap();
        std::fs::create_dir_all(store.join("node_modules/.bin")).unwrap();
        std::fs::write(store.join("node_modules/astro/index.js"), "x").unwrap();
        make_read_only(&store, false).unwrap();
        let before = scan(&store).unwrap().fingerprint;
        assert_eq!(scan(&store).unwrap().fingerprint, before);
        // The marker does not count; a changed file does.
        std::fs::write(store.join(MARKER), "{}").unwrap();
        assert_eq!(scan(&store).unwrap().fingerprint, before);
        let file = store.join("node_modules/astro/index.js");
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert_ne!(scan(&store).unwrap().fingerprint, before);

        let ws = dir.path().join("ws/node_modules");
        std::fs::create_dir_all(ws.join(".vite/deps")).unwrap();
        std::fs::create_dir_all(ws.join("leftover")).unwrap();
        std::os::unix::fs::symlink("/elsewhere", ws.join("astro")).unwrap();
        link_overlay(&store.join("node_modules"), &ws).unwrap();
        let mut names: Vec<String> = std::fs::read_dir(&ws)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, [".bin", ".vite", "astro"]);
        assert_eq!(
            std::fs::read_link(ws.join("astro")).unwrap(),
            store.join("node_modules/astro")
        );
        assert!(ws.join(".vite/deps").is_dir());
        remove_tree(&store).unwrap();
        assert!(!store.exists());
    }
}
