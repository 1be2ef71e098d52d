//! Several upstreams and the routes between them: the one routing step every API's request goes through.
//!
//! A request's `model` picks where it goes: a route of that name tries its targets in order, sending each
//! target's model name; otherwise the first upstream (in the config file's order) whose patterns match serves it
//! under its own name; a model that nothing serves has no targets (the caller answers 400). Cluster nodes with the
//! same config route alike.

use super::Upstream;
use std::sync::Arc;

/// A route as the config file gives it: the model name callers use, and its targets (upstream name, model name
/// sent to it), in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RouteSpec {
    pub model: String,
    pub targets: Vec<(String, String)>,
}

struct Route {
    model: String,
    /// (index of the upstream, model name sent to it).
    targets: Vec<(usize, String)>,
}

/// Where one attempt goes.
#[derive(Clone)]
pub struct Target {
    pub upstream: Arc<Upstream>,
    /// The model name sent to it, when it is not the request's own (a route's target).
    pub model: Option<String>,
}

impl Target {
    /// The model name this target is sent, the request's being `requested`.
    pub fn model<'a>(&'a self, requested: &'a str) -> &'a str {
        self.model.as_deref().unwrap_or(requested)
    }
}

pub struct Upstreams {
    list: Vec<Arc<Upstream>>,
    routes: Vec<Route>,
}

impl Upstreams {
    /// One upstream serving every model (the single-upstream settings).
    pub fn single(upstream: Upstream) -> Self {
        Self { list: vec![Arc::new(upstream)], routes: Vec::new() }
    }

    /// Upstreams in the config file's order and the routes between them; a route's target naming no upstream is
    /// left out (the settings refuse such a file before this).
    pub fn new(list: Vec<Upstream>, routes: &[RouteSpec]) -> Self {
        let list: Vec<Arc<Upstream>> = list.into_iter().map(Arc::new).collect();
        let index = |name: &str| list.iter().position(|u| u.name() == name);
        let routes = routes
            .iter()
            .map(|spec| Route {
                model: spec.model.clone(),
                targets: spec
                    .targets
                    .iter()
                    .filter_map(|(upstream, model)| Some((index(upstream)?, model.clone())))
                    .collect(),
            })
            .collect();
        Self { list, routes }
    }

    /// Where a request for `model` goes, in order; empty when nothing serves it.
    pub fn route(&self, model: &str) -> Vec<Target> {
        if let Some(route) = self.routes.iter().find(|r| r.model == model) {
            return route
                .targets
                .iter()
                .filter_map(|(index, target)| {
                    let upstream = self.list.get(*index)?.clone();
                    Some(Target { upstream, model: Some(target.clone()) })
                })
                .collect();
        }
        self.list
            .iter()
            .find(|u| u.serves(model))
            .map(|upstream| Target { upstream: upstream.clone(), model: None })
            .into_iter()
            .collect()
    }

    /// Every upstream, in order.
    pub fn all(&self) -> &[Arc<Upstream>] {
        &self.list
    }

    /// The routes' model names.
    pub fn route_names(&self) -> impl Iterator<Item = &str> {
        self.routes.iter().map(|r| r.model.as_str())
    }

    /// Whether there is one upstream and no route: the single-upstream settings.
    pub fn is_single(&self) -> bool {
        self.list.len() == 1 && self.routes.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn upstream(name: &str, patterns: Option<&[&str]>) -> Upstream {
        let set = patterns.map(|patterns| {
            let mut builder = globset::GlobSetBuilder::new();
            for p in patterns {
                builder.add(globset::Glob::new(p).unwrap());
            }
            builder.build().unwrap()
        });
        Upstream::new(&"http://127.0.0.1:1/v1".parse().unwrap(), None, false).named(name, set, false)
    }

    #[test]
    fn a_route_wins_then_the_first_matching_upstream_and_nothing_else() {
        let upstreams = Upstreams::new(
            vec![upstream("openai", Some(&["gpt-*", "o*"])), upstream("local", Some(&["llama*"]))],
            &[RouteSpec {
                model: "fast".into(),
                targets: vec![("openai".into(), "gpt-4o-mini".into()), ("local".into(), "llama3.1:8b".into())],
            }],
        );
        let fast = upstreams.route("fast");
        let names: Vec<(&str, &str)> = fast.iter().map(|t| (t.upstream.name(), t.model("fast"))).collect();
        assert_eq!(names, [("openai", "gpt-4o-mini"), ("local", "llama3.1:8b")]);
        let gpt = upstreams.route("gpt-4o");
        assert_eq!((gpt.len(), gpt[0].upstream.name(), gpt[0].model("gpt-4o")), (1, "openai", "gpt-4o"));
        assert_eq!(upstreams.route("llama3.1:8b")[0].upstream.name(), "local");
        assert!(upstreams.route("claude").is_empty());
        assert_eq!(upstreams.route_names().collect::<Vec<_>>(), ["fast"]);
        assert!(!upstreams.is_single());
        assert!(Upstreams::single(upstream("default", None)).route("anything").len() == 1);
    }
}
