//! `spec.listeners` on the real API server, with the listener example
//! (`examples/pushcluster-listeners.yaml`: ClusterIP and LoadBalancer with
//! TLS in the pods, NodePort, Ingress with a cert-manager issuer, Gateway):
//! the objects of each type exist, are owned by the PushCluster and carry
//! the TLS settings; node ports and (as a cloud's controller would write
//! them) load balancer addresses become the addresses web gives clients,
//! checked through `/1/server/get`; HTTPRoutes appear once the Gateway API
//! is installed; a comet serving TLS keeps its connections across a
//! certificate rotation through the Secret; a removed listener's objects go.
//!
//! The harness has no ingress controller, cloud or Gateway implementation:
//! what they would do with the objects is theirs; what is checked is what
//! the operator writes and web answers. The Gateway API's HTTPRoute CRD is
//! the file `E2E_GATEWAY_API_CRD` names (e.g. the Gateway API release's
//! `gateway.networking.k8s.io_httproutes.yaml`), else a stand-in with the
//! same group, version and kind and the fields the operator writes.

use anyhow::Context;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::Ingress;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::{Client, Resource, ResourceExt};
use push_operator::children::listeners::{HTTPRoute, LISTENER_LABEL};
use push_operator::crd::{ListenerEndpoints, PushCluster};
use pushcluster_client::http::{Client as HttpApi, Proto};
use pushcluster_client::sub::{Params, Subscriber};
use pushcluster_client::Frame;
use pushcluster_core::tls::testing::{Leaf, TestCa};
use pushcluster_e2e::setup::{first_push, ChartOperator};
use pushcluster_e2e::traffic::ServiceProxy;
use pushcluster_e2e::{
    apply_example, credentials, full_cluster, kubectl, rollout_status, wait, wait_ready,
    TestNamespace,
};
use serde_json::json;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

const LIMIT: Duration = Duration::from_secs(240);
const CLUSTER: &str = "push";
/// The addresses the stand-in cloud gives the load balancers: web's, then
/// shard k's at 10 + k.
const LB_WEB: &str = "203.0.113.100";

fn lb_ip(shard: Option<u32>) -> String {
    shard.map_or(LB_WEB.to_owned(), |k| format!("203.0.113.{}", 10 + k))
}

/// A certificate for every name a client in the cluster uses.
fn leaf(ca: &TestCa, ns: &str) -> Leaf {
    let names: Vec<String> = ["push-inside", "push-inside-0", "push-inside-1"]
        .iter()
        .map(|s| format!("{s}.{ns}.svc"))
        .chain(["push.example.com".to_owned()])
        .collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    ca.leaf(&refs)
}

async fn tls_secret(client: &Client, ns: &str, leaf: &Leaf) -> anyhow::Result<()> {
    let secrets: Api<k8s_openapi::api::core::v1::Secret> = Api::namespaced(client.clone(), ns);
    let s = json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "push-tls"},
        "type": "kubernetes.io/tls",
        "stringData": {"tls.crt": leaf.cert_pem, "tls.key": leaf.key_pem},
    });
    secrets
        .patch(
            "push-tls",
            &PatchParams::apply("pushcluster-e2e").force(),
            &Patch::Apply(&s),
        )
        .await?;
    Ok(())
}

/// Names of the listener objects of kind `K` in `ns`, with whether each is
/// controlled by the PushCluster of uid `uid`.
async fn listener_objects<K>(
    client: &Client,
    ns: &str,
    uid: &str,
) -> anyhow::Result<BTreeMap<String, bool>>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
    <K as Resource>::DynamicType: Default,
{
    let api: Api<K> = Api::namespaced(client.clone(), ns);
    let lp = ListParams::default().labels(LISTENER_LABEL);
    Ok(api
        .list(&lp)
        .await?
        .items
        .into_iter()
        .map(|o| {
            let owned = o
                .owner_references()
                .iter()
                .any(|r| r.uid == uid && r.kind == "PushCluster" && r.controller == Some(true));
            (o.name_any(), owned)
        })
        .collect())
}

fn names(of: &[&str]) -> BTreeSet<String> {
    of.iter()
        .flat_map(|l| {
            [
                format!("push-{l}"),
                format!("push-{l}-0"),
                format!("push-{l}-1"),
            ]
        })
        .collect()
}

async fn endpoints(pcs: &Api<PushCluster>) -> anyhow::Result<Vec<ListenerEndpoints>> {
    Ok(pcs
        .get(CLUSTER)
        .await?
        .status
        .and_then(|s| s.endpoints)
        .map(|e| e.listeners)
        .unwrap_or_default())
}

fn listener<'a>(e: &'a [ListenerEndpoints], name: &str) -> anyhow::Result<&'a ListenerEndpoints> {
    e.iter()
        .find(|l| l.name == name)
        .with_context(|| format!("status.endpoints.listeners has no {name}: {e:?}"))
}

/// The HTTPRoute CRD: the Gateway API's own from `E2E_GATEWAY_API_CRD`, or
/// a stand-in of the same group, version and kind.
fn gateway_api_crd() -> anyhow::Result<(CustomResourceDefinition, &'static str)> {
    if let Ok(path) = std::env::var("E2E_GATEWAY_API_CRD") {
        let text = std::fs::read_to_string(&path).with_context(|| path.clone())?;
        return Ok((serde_yaml::from_str(&text)?, "the Gateway API's own CRD"));
    }
    let crd = json!({
        "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
        "metadata": {"name": "httproutes.gateway.networking.k8s.io"},
        "spec": {
            "group": "gateway.networking.k8s.io",
            "names": {"kind": "HTTPRoute", "listKind": "HTTPRouteList", "plural": "httproutes", "singular": "httproute"},
            "scope": "Namespaced",
            "versions": [{"name": "v1", "served": true, "storage": true, "schema": {"openAPIV3Schema": {
                "type": "object",
                "properties": {"spec": {"type": "object", "x-kubernetes-preserve-unknown-fields": true}},
            }}}],
        },
    });
    Ok((
        serde_json::from_value(crd)?,
        "a stand-in CRD (set E2E_GATEWAY_API_CRD for the Gateway API's)",
    ))
}

/// The certificate a new TLS handshake through `at` is shown for `name`.
async fn served(
    at: std::net::SocketAddr,
    name: &str,
    tls: Arc<rustls::ClientConfig>,
) -> anyhow::Result<Vec<u8>> {
    let tcp = tokio::net::TcpStream::connect(at).await?;
    let sni = rustls::pki_types::ServerName::try_from(name.to_owned())?;
    let s = tokio_rustls::TlsConnector::from(tls)
        .connect(sni, tcp)
        .await?;
    Ok(s.get_ref()
        .1
        .peer_certificates()
        .context("no certificate")?[0]
        .to_vec())
}

/// The next message of `sub`, skipping heartbeats.
async fn next_message(sub: &mut Subscriber) -> anyhow::Result<serde_json::Value> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        anyhow::ensure!(!left.is_zero(), "no message within 10 s");
        match sub.next_timeout(left).await? {
            Frame::Message(m) => return Ok(m.msg),
            Frame::Heartbeat => {}
            other => anyhow::bail!("unexpected frame {other:?}"),
        }
    }
}

#[tokio::test]
async fn listeners_of_every_type_on_the_real_api_server() -> anyhow::Result<()> {
    let Some((client, images)) = full_cluster().await else {
        return Ok(());
    };
    let op = ChartOperator::install(&client, &images, "pco-ls").await?;
    let ns = TestNamespace::create(&client, "ls").await?;
    let result = scenario(&client, &images.image(), &ns.name, &op).await;
    ns.delete().await?;
    op.uninstall().await?;
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let _ = crds
        .delete("httproutes.gateway.networking.k8s.io", &Default::default())
        .await;
    result
}

/// The pods named by EndpointSlice `name`'s ready endpoints.
async fn slice_pods(client: &Client, ns: &str, name: &str) -> anyhow::Result<Vec<String>> {
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), ns);
    Ok(slices
        .get(name)
        .await?
        .endpoints
        .into_iter()
        .filter(|e| e.conditions.as_ref().and_then(|c| c.ready) != Some(false))
        .filter_map(|e| e.target_ref.and_then(|r| r.name))
        .collect())
}

async fn holder(client: &Client, ns: &str, shard: u32) -> anyhow::Result<String> {
    let leases: Api<Lease> = Api::namespaced(client.clone(), ns);
    Ok(leases
        .get(&format!("{CLUSTER}-comet-{shard}"))
        .await?
        .spec
        .and_then(|s| s.holder_identity)
        .unwrap_or_default())
}

async fn scenario(
    client: &Client,
    image: &str,
    ns: &str,
    op: &ChartOperator,
) -> anyhow::Result<()> {
    let ca = TestCa::new("pushcluster e2e CA");
    let first = leaf(&ca, ns);
    tls_secret(client, ns, &first).await?;
    let t = Instant::now();
    let (n, i) = (ns.to_owned(), image.to_owned());
    tokio::task::spawn_blocking(move || apply_example("pushcluster-listeners.yaml", &n, &i))
        .await??;
    wait_ready(client, ns, CLUSTER, 2, LIMIT).await?;
    let pcs: Api<PushCluster> = Api::namespaced(client.clone(), ns);
    let uid = pcs.get(CLUSTER).await?.uid().context("uid")?;

    // Every type's objects, owned; no HTTPRoute without the Gateway API.
    let want_services = names(&["inside", "nodes", "public"]);
    let want_ingresses = names(&["ingress"]);
    wait("the listener Services and Ingresses", LIMIT, || async {
        let s = listener_objects::<Service>(client, ns, &uid).await?;
        let i = listener_objects::<Ingress>(client, ns, &uid).await?;
        Ok(s.keys().cloned().collect::<BTreeSet<_>>() == want_services
            && i.keys().cloned().collect::<BTreeSet<_>>() == want_ingresses)
    })
    .await?;
    let services = listener_objects::<Service>(client, ns, &uid).await?;
    let ingresses = listener_objects::<Ingress>(client, ns, &uid).await?;
    anyhow::ensure!(
        services
            .values()
            .chain(ingresses.values())
            .all(|owned| *owned),
        "not every listener object is controlled by the PushCluster: {services:?} {ingresses:?}"
    );
    let e = endpoints(&pcs).await?;
    let gw = listener(&e, "gw")?;
    anyhow::ensure!(
        gw.pending
            .as_deref()
            .is_some_and(|p| p.contains("Gateway API")),
        "the Gateway listener without the Gateway API: {gw:?}"
    );
    println!(
        "PASS LS kubectl apply pushcluster-listeners.yaml: Ready in {:.1} s; {} Services (ClusterIP, NodePort, LoadBalancer) and {} Ingresses, web's and one per shard, each controlled by the PushCluster; the Gateway listener pending: {:?}",
        t.elapsed().as_secs_f64(),
        services.len(),
        ingresses.len(),
        gw.pending.as_deref().unwrap_or_default()
    );

    // TLS settings as the objects carry them.
    let ing: Api<Ingress> = Api::namespaced(client.clone(), ns);
    let shard_ing = ing.get("push-ingress-1").await?;
    let a = shard_ing.annotations();
    let spec = shard_ing.spec.clone().context("Ingress spec")?;
    let tls = spec.tls.clone().unwrap_or_default();
    let rule = spec.rules.clone().unwrap_or_default();
    let backend = rule
        .first()
        .and_then(|r| r.http.as_ref())
        .and_then(|h| h.paths.first())
        .and_then(|p| p.backend.service.clone())
        .context("Ingress backend")?;
    anyhow::ensure!(
        a.get("cert-manager.io/cluster-issuer").map(String::as_str) == Some("letsencrypt")
            && a.get("nginx.ingress.kubernetes.io/proxy-read-timeout")
                .map(String::as_str)
                == Some("3600")
            && a.get("nginx.ingress.kubernetes.io/proxy-buffering")
                .map(String::as_str)
                == Some("off")
            && spec.ingress_class_name.as_deref() == Some("nginx")
            && tls.first().and_then(|t| t.secret_name.as_deref()) == Some("push-ingress-1-tls")
            && tls.first().and_then(|t| t.hosts.clone())
                == Some(vec!["push-1.push.example.com".to_owned()])
            && rule.first().and_then(|r| r.host.as_deref()) == Some("push-1.push.example.com")
            && backend.name == "push-comet-1",
        "push-ingress-1 as the API server has it: {shard_ing:?}"
    );
    let svc: Api<Service> = Api::namespaced(client.clone(), ns);
    let port_names = |s: &Service| -> Vec<(String, i32, Option<i32>)> {
        s.spec
            .iter()
            .flat_map(|s| s.ports.iter().flatten())
            .map(|p| (p.name.clone().unwrap_or_default(), p.port, p.node_port))
            .collect()
    };
    let public0 = port_names(&svc.get("push-public-0").await?);
    anyhow::ensure!(
        public0.iter().any(|(n, p, _)| n == "wss" && *p == 443),
        "push-public-0 ports: {public0:?}"
    );
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), ns);
    for d in ["push-comet", "push-web"] {
        let pod = deployments
            .get(d)
            .await?
            .spec
            .and_then(|s| s.template.spec)
            .context("pod spec")?;
        let mounted =
            pod.volumes.iter().flatten().any(|v| {
                v.secret.as_ref().and_then(|s| s.secret_name.as_deref()) == Some("push-tls")
            });
        anyhow::ensure!(mounted, "{d} does not mount push-tls");
    }
    println!(
        "PASS LS TLS settings: Ingress push-ingress-1 host push-1.push.example.com -> Service push-comet-1, tls Secret push-ingress-1-tls, cert-manager.io/cluster-issuer=letsencrypt, ingress-nginx read timeout 3600 s and buffering off; push-public-0 wss on 443; comets and web mount push-tls"
    );

    // NodePort: the allocated ports are what the status gives.
    let nodes_web = port_names(&svc.get("push-nodes").await?);
    let nodes_1 = port_names(&svc.get("push-nodes-1").await?);
    let np = |ports: &[(String, i32, Option<i32>)], name: &str| {
        ports
            .iter()
            .find(|(n, _, _)| n == name)
            .and_then(|(_, _, np)| *np)
    };
    let (web_np, ws_np, tcp_np) = (
        np(&nodes_web, "http").context("push-nodes has no node port")?,
        np(&nodes_1, "ws").context("push-nodes-1 has no ws node port")?,
        np(&nodes_1, "tcp").context("push-nodes-1 has no tcp node port")?,
    );
    let want_web = format!("http://nodes.push.example.com:{web_np}");
    let want_ws = format!("nodes.push.example.com:{ws_np}");
    wait(
        "the NodePort listener's addresses in the status",
        LIMIT,
        || async {
            let e = endpoints(&pcs).await?;
            let l = listener(&e, "nodes")?;
            Ok(l.pending.is_none()
                && l.web.as_deref() == Some(want_web.as_str())
                && l.shards.get(1).and_then(|s| s.ws.as_deref()) == Some(want_ws.as_str()))
        },
    )
    .await?;
    println!(
        "PASS LS NodePort: status.endpoints.listeners[nodes] web {want_web}, shard 1 ws {want_ws} tcp nodes.push.example.com:{tcp_np}: the node ports the API server allocated"
    );

    // LoadBalancer: pending until the cloud writes addresses, then web
    // gives clients those.
    let e = endpoints(&pcs).await?;
    anyhow::ensure!(
        listener(&e, "public")?.pending.is_some(),
        "the LoadBalancer listener before any address: {e:?}"
    );
    let creds = credentials(client, ns, CLUSTER).await?;
    let admin = ServiceProxy::start(client, ns, "push-web-admin", "admin").await?;
    let public = ServiceProxy::start(client, ns, "push-web", "public").await?;
    let api = HttpApi::new(&public.url(), &admin.url(), Some(creds.admin_token.clone()));
    first_push(&api, "ls-0", r#"{"n":0}"#).await?;
    let before = api.resolve("ls-0", Proto::WebSocket).await?;
    anyhow::ensure!(
        !before.starts_with("203.0.113."),
        "an address before the load balancers have one: {before}"
    );
    let t = Instant::now();
    for shard in [None, Some(0), Some(1)] {
        let name = match shard {
            None => "push-public".to_owned(),
            Some(k) => format!("push-public-{k}"),
        };
        let status = json!({"status": {"loadBalancer": {"ingress": [{"ip": lb_ip(shard)}]}}});
        svc.patch_status(&name, &PatchParams::default(), &Patch::Merge(&status))
            .await?;
    }
    wait(
        "the LoadBalancer listener's addresses in the status",
        LIMIT,
        || async {
            let e = endpoints(&pcs).await?;
            let l = listener(&e, "public")?;
            Ok(l.pending.is_none() && l.web == Some(format!("https://{LB_WEB}:443")))
        },
    )
    .await?;
    let in_status = t.elapsed();
    let want: BTreeSet<String> = (0..2).map(|k| format!("{}:443", lb_ip(Some(k)))).collect();
    let keys: Vec<String> = (0..24).map(|i| format!("ls-{i}")).collect();
    let resolve_all = || async {
        let mut seen = BTreeMap::new();
        for k in &keys {
            let a = api.resolve(k, Proto::WebSocket).await.unwrap_or_default();
            seen.insert(k.clone(), a);
        }
        seen
    };
    let advertised = |seen: &BTreeMap<String, String>| {
        seen.values().all(|a| want.contains(a)) && seen.values().collect::<BTreeSet<_>>().len() == 2
    };
    wait(
        "web to give clients the load balancers' addresses",
        LIMIT,
        || async { Ok(advertised(&resolve_all().await)) },
    )
    .await?;
    let seen = resolve_all().await;
    anyhow::ensure!(advertised(&seen), "web's answers changed back: {seen:?}");
    let tcp = api.resolve("ls-0", Proto::Tcp).await?;
    let ws0 = &seen["ls-0"];
    anyhow::ensure!(
        tcp == ws0.replace(":443", ":6969"),
        "ls-0 over TCP: {tcp}, over WebSocket {ws0}"
    );
    let (n, c) = (ns.to_owned(), CLUSTER.to_owned());
    tokio::task::spawn_blocking(move || rollout_status(&n, &c, LIMIT)).await??;
    println!(
        "PASS LS LoadBalancer: pending until the load balancers had addresses; {:.1} s after they did, status.endpoints.listeners[public] web https://{LB_WEB}:443; /1/server/get gives each of 24 keys its shard's load balancer ({}), TCP on :6969; web rolled once to take them",
        in_status.as_secs_f64(),
        want.iter().cloned().collect::<Vec<_>>().join(", ")
    );

    // Gateway API: once installed, the HTTPRoutes appear.
    let (crd, which) = gateway_api_crd()?;
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    crds.patch(
        "httproutes.gateway.networking.k8s.io",
        &PatchParams::apply("pushcluster-e2e").force(),
        &Patch::Apply(&crd),
    )
    .await?;
    let t = Instant::now();
    let routes: Api<HTTPRoute> = Api::namespaced(client.clone(), ns);
    let want_routes = names(&["gw"]);
    wait(
        "the HTTPRoutes after the Gateway API is installed",
        LIMIT,
        || async {
            let r = match routes
                .list(&ListParams::default().labels(LISTENER_LABEL))
                .await
            {
                Ok(r) => r,
                Err(_) => return Ok(false),
            };
            Ok(r.items
                .iter()
                .map(|r| r.name_any())
                .collect::<BTreeSet<_>>()
                == want_routes)
        },
    )
    .await?;
    let r = routes.get("push-gw-1").await?;
    anyhow::ensure!(
        r.spec.hostnames == ["gw-1.push.example.com"]
            && r.spec.parent_refs[0].name == "public"
            && r.spec.parent_refs[0].namespace.as_deref() == Some("gateways")
            && r.spec.rules[0].backend_refs[0].name == "push-comet-1"
            && r.owner_references()
                .iter()
                .any(|o| o.uid == uid && o.controller == Some(true)),
        "push-gw-1 as the API server has it: {r:?}"
    );
    wait("the Gateway listener no longer pending", LIMIT, || async {
        Ok(listener(&endpoints(&pcs).await?, "gw")?.pending.is_none())
    })
    .await?;
    println!(
        "PASS LS Gateway: {:.1} s after the HTTPRoute CRD ({which}) was installed, HTTPRoutes push-gw, push-gw-0, push-gw-1 (host gw-1.push.example.com -> Service push-comet-1, parent gateways/public), controlled by the PushCluster",
        t.elapsed().as_secs_f64()
    );

    // A comet serving TLS keeps its connections across a rotation: a
    // subscriber through the ClusterIP listener's shard Service.
    let key = "ls-0";
    let shard: u32 = seen[key]
        .trim_end_matches(":443")
        .rsplit('.')
        .next()
        .and_then(|o| o.parse::<u32>().ok())
        .map(|o| o - 10)
        .context("shard of ls-0")?;
    let host = format!("push-inside-{shard}.{ns}.svc");
    let wss = ServiceProxy::start(client, ns, &format!("push-inside-{shard}"), "wss").await?;
    let web_tls = ServiceProxy::start(client, ns, "push-inside", "https").await?;
    let trust = ca.client_config();
    let p = Params {
        key: key.to_owned(),
        heartbeat: 30,
        token: Some(pushcluster_core::token::mint_for(
            creds.subscriber_secret.as_bytes(),
            key,
            3600,
        )),
        versioned: true,
    };
    let mut old =
        Subscriber::websocket_tls_via(wss.addr, &format!("{host}:6972"), &p, Some(trust.clone()))
            .await?;
    anyhow::ensure!(
        old.peer_certificate() == Some(first.der.clone()),
        "the first certificate"
    );
    anyhow::ensure!(
        served(
            web_tls.addr,
            &format!("push-inside.{ns}.svc"),
            trust.clone()
        )
        .await?
            == first.der,
        "web's TLS port shows another certificate"
    );
    // The first frame is the heartbeat: the comet has registered us.
    anyhow::ensure!(
        old.next_timeout(Duration::from_secs(10)).await? == Frame::Heartbeat,
        "no heartbeat"
    );
    api.push(key, r#"{"n":1}"#, None).await?;
    anyhow::ensure!(
        next_message(&mut old).await?["n"] == 1,
        "push 1 not received"
    );
    let second = leaf(&ca, ns);
    tls_secret(client, ns, &second).await?;
    let t = Instant::now();
    let sni = host.clone();
    wait(
        "new handshakes to show the rotated certificate",
        LIMIT,
        || async {
            Ok(served(wss.addr, &sni, trust.clone()).await? == second.der
                && served(
                    web_tls.addr,
                    &format!("push-inside.{ns}.svc"),
                    trust.clone(),
                )
                .await?
                    == second.der)
        },
    )
    .await?;
    let rotated = t.elapsed();
    let mut new =
        Subscriber::websocket_tls_via(wss.addr, &format!("{host}:6972"), &p, Some(trust.clone()))
            .await?;
    anyhow::ensure!(
        new.peer_certificate() == Some(second.der.clone()),
        "the second certificate"
    );
    anyhow::ensure!(
        new.next_timeout(Duration::from_secs(10)).await? == Frame::Heartbeat,
        "no heartbeat after the rotation"
    );
    api.push(key, r#"{"n":2}"#, None).await?;
    anyhow::ensure!(
        next_message(&mut old).await?["n"] == 2,
        "the old connection lost push 2"
    );
    anyhow::ensure!(
        next_message(&mut new).await?["n"] == 2,
        "the new connection lost push 2"
    );
    anyhow::ensure!(
        old.peer_certificate() == Some(first.der.clone()),
        "the old connection changed"
    );
    println!(
        "PASS LS TLS in the pods: a wss subscriber through Service push-inside-{shard} (SNI {host}) and web's https port served the Secret's certificate; after the Secret was updated, new handshakes got the new one within {:.1} s (kubelet sync + the comet's re-read) while the connection opened before kept receiving (push 2 on both)",
        rotated.as_secs_f64()
    );

    // The shard Services of Service listeners have no selector: the Lease
    // holder wrote itself into their EndpointSlices.
    for k in 0..2u32 {
        let h = holder(client, ns, k).await?;
        for l in ["inside", "nodes", "public"] {
            let pods = slice_pods(client, ns, &format!("push-{l}-{k}")).await?;
            anyhow::ensure!(
                pods == [h.clone()],
                "push-{l}-{k} names {pods:?}, shard {k}'s holder is {h}"
            );
        }
    }
    println!("PASS LS the per-shard Services of the ClusterIP, NodePort and LoadBalancer listeners have no selector; each shard's Lease holder wrote itself into their EndpointSlices");

    // Removing listeners removes their objects.
    let t = Instant::now();
    let mut pc = pcs.get(CLUSTER).await?;
    pc.spec
        .listeners
        .retain(|l| l.name == "inside" || l.name == "public");
    let patch = json!({"spec": {"listeners": pc.spec.listeners}});
    pcs.patch(CLUSTER, &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    wait("the removed listeners' objects to go", LIMIT, || async {
        let s = listener_objects::<Service>(client, ns, &uid).await?;
        let i = listener_objects::<Ingress>(client, ns, &uid).await?;
        let r = routes
            .list(&ListParams::default().labels(LISTENER_LABEL))
            .await?;
        let e = endpoints(&pcs).await?;
        Ok(
            s.keys().cloned().collect::<BTreeSet<_>>() == names(&["inside", "public"])
                && i.is_empty()
                && r.items.is_empty()
                && e.iter().map(|l| l.name.as_str()).collect::<Vec<_>>() == ["inside", "public"],
        )
    })
    .await?;
    let gone = t.elapsed();
    // Nothing else went with them: the web Service and the shard Services.
    for s in ["push-web", "push-comet-0", "push-comet-1"] {
        svc.get(s).await.with_context(|| format!("{s} is gone"))?;
    }
    let left = kubectl(
        &[
            "get",
            "services,ingresses",
            "-n",
            ns,
            "-l",
            LISTENER_LABEL,
            "-o",
            "name",
        ],
        None,
    );
    println!(
        "PASS LS listeners nodes, ingress and gw removed from the spec: their Services, Ingresses and HTTPRoutes gone in {:.1} s, the status lists inside and public; left: {}",
        gone.as_secs_f64(),
        left.unwrap_or_default().split_whitespace().collect::<Vec<_>>().join(" ")
    );

    // A failover with no operator running: the listener's shard Service
    // follows the new holder.
    op.scale_to_zero(client).await?;
    let old = holder(client, ns, shard).await?;
    let slice = format!("push-public-{shard}");
    anyhow::ensure!(
        slice_pods(client, ns, &slice).await? == [old.clone()],
        "{slice} before the failover"
    );
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let t = Instant::now();
    pods.delete(&old, &Default::default()).await?;
    wait(
        "the listener's shard Service to follow the new holder",
        LIMIT,
        || async {
            let h = holder(client, ns, shard).await?;
            let named = slice_pods(client, ns, &slice).await?;
            let followed = !h.is_empty() && h != old && named == [h.clone()];
            Ok(followed)
        },
    )
    .await?;
    let followed = t.elapsed();
    let new = holder(client, ns, shard).await?;
    println!(
        "PASS LS failover with the operator scaled to 0: {old} deleted, {slice} named the new holder {new} after {:.2} s (no relabel, no operator)",
        followed.as_secs_f64()
    );
    Ok(())
}
