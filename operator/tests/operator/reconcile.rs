//! Reconcile against kube's mocked API service (tower-test) with a small
//! stateful fake API server: each test is a story of the exact requests the
//! reconciler makes: a first reconcile, a no-op one (zero writes), a shard
//! count change, and a rejected apply.

use http::{Method, Request, Response};
use kube::client::Body;
use kube::{Client, Resource};
use push_operator::children::{desired, Child, CredentialDigests, Facts};
use push_operator::controller::{error_policy, reconcile, Context, Metrics};
use push_operator::crd::PushCluster;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// One request as the fake saw it.
#[derive(Debug, Clone)]
struct Seen {
    method: Method,
    path: String,
    query: String,
    body: Value,
}

#[derive(Default)]
struct Fake {
    objects: BTreeMap<String, Value>,
    log: Vec<Seen>,
    /// Paths whose apply is rejected with 422.
    reject: Vec<String>,
    /// Answer every request with 503, as an API server that is down.
    down: bool,
    rv: u64,
}

type Shared = Arc<Mutex<Fake>>;

fn respond(status: u16, v: &Value) -> Response<Body> {
    Response::builder()
        .status(status)
        .body(Body::from(serde_json::to_vec(v).unwrap()))
        .unwrap()
}

fn not_found() -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "reason": "NotFound", "code": 404, "message": "not found"})
}

fn merge(into: &mut Value, patch: &Value) {
    match (into, patch) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in b {
                merge(a.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
        (a, b) => *a = b.clone(),
    }
}

fn start(fake: Shared) -> Client {
    let (svc, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    tokio::spawn(async move {
        while let Some((req, send)) = handle.next_request().await {
            let method = req.method().clone();
            let path = req.uri().path().to_owned();
            let query = req.uri().query().unwrap_or_default().to_owned();
            let bytes = req.into_body().collect_bytes().await.unwrap();
            let body: Value = if bytes.is_empty() {
                Value::Null
            } else {
                serde_json::from_slice(&bytes).unwrap()
            };
            let mut f = fake.lock().unwrap();
            f.log.push(Seen {
                method: method.clone(),
                path: path.clone(),
                query,
                body: body.clone(),
            });
            let reply = if f.down {
                respond(
                    503,
                    &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "reason": "ServiceUnavailable", "code": 503, "message": "etcd is down"}),
                )
            } else {
                match method {
                    Method::GET => match f.objects.get(&path) {
                        Some(o) => respond(200, o),
                        None => {
                            // A collection: every stored object directly below it.
                            let items: Vec<Value> = f
                                .objects
                                .iter()
                                .filter(|(p, _)| {
                                    p.rsplit_once('/').map(|(dir, _)| dir) == Some(path.as_str())
                                })
                                .map(|(_, o)| o.clone())
                                .collect();
                            // Namespaced collections: /api/v1/namespaces/ns/<plural>
                            // (6 segments) or /apis/<group>/<v>/namespaces/ns/<plural> (7).
                            let segments = path.split('/').count();
                            let is_list = if path.starts_with("/api/") {
                                segments == 6
                            } else {
                                segments == 7
                            };
                            if is_list {
                                respond(
                                    200,
                                    &json!({"apiVersion": "v1", "kind": "List", "metadata": {"resourceVersion": "1"}, "items": items}),
                                )
                            } else {
                                respond(404, &not_found())
                            }
                        }
                    },
                    Method::PATCH if path.starts_with(SECRETS) => {
                        // A merge patch of a Secret's stringData, as the
                        // API server stores it: into data.
                        let obj = f.objects.entry(path).or_insert(json!({}));
                        merge(obj, &as_stored(&body));
                        respond(200, &obj.clone())
                    }
                    Method::PATCH if path.ends_with("/status") => {
                        let obj_path = path.trim_end_matches("/status").to_owned();
                        let obj = f.objects.entry(obj_path).or_insert(json!({}));
                        merge(obj, &body);
                        respond(200, &obj.clone())
                    }
                    Method::PATCH if f.reject.contains(&path) => respond(
                        422,
                        &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "reason": "Invalid", "code": 422, "message": "rejected by admission"}),
                    ),
                    Method::PATCH => {
                        // Server-side apply: fields the patch does not name
                        // (a Lease's spec, written by comets) are kept.
                        f.rv += 1;
                        let rv = f.rv;
                        let obj = f
                            .objects
                            .entry(path)
                            .or_insert_with(|| json!({"metadata": {"uid": format!("uid-{rv}")}}));
                        merge(obj, &body);
                        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
                        respond(200, &obj.clone())
                    }
                    Method::POST if path.ends_with("/events") => respond(201, &body),
                    Method::POST => {
                        let name = body["metadata"]["name"].as_str().unwrap_or_default();
                        let obj_path = format!("{path}/{name}");
                        if f.objects.contains_key(&obj_path) {
                            respond(
                                409,
                                &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "reason": "AlreadyExists", "code": 409, "message": "exists"}),
                            )
                        } else {
                            f.rv += 1;
                            let mut obj = as_stored(&body);
                            obj["metadata"]["resourceVersion"] = json!(f.rv.to_string());
                            f.objects.insert(obj_path, obj.clone());
                            respond(201, &obj)
                        }
                    }
                    Method::DELETE => {
                        f.objects.remove(&path);
                        respond(
                            200,
                            &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success"}),
                        )
                    }
                    other => panic!("unexpected {other} {path}"),
                }
            };
            drop(f);
            send.send_response(reply);
        }
    });
    Client::new(svc, "team-a")
}

/// An object as the API server stores it: a Secret's stringData is base64
/// data.
fn as_stored(body: &Value) -> Value {
    use base64::Engine;
    let mut obj = body.clone();
    if let Some(Value::Object(sd)) = obj.as_object_mut().and_then(|o| o.remove("stringData")) {
        for (k, v) in sd {
            let b =
                base64::engine::general_purpose::STANDARD.encode(v.as_str().unwrap_or_default());
            obj["data"][k] = json!(b);
        }
    }
    obj
}

/// What the children are built from, as the fake holds it: the
/// credentials' digests (and `ReadWriteOnce`, as the fake gives no version).
fn facts(fake: &Shared) -> Facts {
    let f = fake.lock().unwrap();
    let creds = f
        .objects
        .get(&format!("{SECRETS}/push-credentials"))
        .map(|s| CredentialDigests::of(&serde_json::from_value(s.clone()).unwrap()))
        .unwrap_or_default();
    let rpc_tls = f.objects.get(&format!("{SECRETS}/push-rpc-tls")).map(|s| {
        push_operator::children::rpc_tls::digest(&serde_json::from_value(s.clone()).unwrap())
    });
    Facts {
        creds,
        rpc_tls,
        ..Facts::default()
    }
}

/// Puts the PushCluster into the fake, as the API server holds it.
fn seed(fake: &Shared, pc: &PushCluster) {
    let mut v = serde_json::to_value(pc).unwrap();
    v["apiVersion"] = json!("pushcluster.io/v1alpha1");
    v["kind"] = json!("PushCluster");
    fake.lock()
        .unwrap()
        .objects
        .insert(STATUS.trim_end_matches("/status").to_owned(), v);
}

fn cluster(shards: i32) -> PushCluster {
    let mut pc = PushCluster::new(
        "push",
        serde_json::from_value(json!({"comet": {"shards": shards}})).unwrap(),
    );
    pc.metadata.namespace = Some("team-a".into());
    pc.metadata.uid = Some("pc-uid".into());
    pc.metadata.generation = Some(1);
    pc
}

const NS: &str = "team-a";

fn path_of(c: &Child) -> String {
    let r = &c.resource();
    let base = if r.group.is_empty() {
        format!("/api/{}", r.version)
    } else {
        format!("/apis/{}/{}", r.group, r.version)
    };
    format!("{base}/namespaces/{NS}/{}/{}", r.plural, c.name())
}

const LEASES: &str = "/apis/coordination.k8s.io/v1/namespaces/team-a/leases";
const SERVICES: &str = "/api/v1/namespaces/team-a/services";
const SLICES: &str = "/apis/discovery.k8s.io/v1/namespaces/team-a/endpointslices";
const DEPLOYMENTS: &str = "/apis/apps/v1/namespaces/team-a/deployments";
const STATEFULSETS: &str = "/apis/apps/v1/namespaces/team-a/statefulsets";
const PODS: &str = "/api/v1/namespaces/team-a/pods";
const SECRETS: &str = "/api/v1/namespaces/team-a/secrets";
const EVENTS: &str = "/apis/events.k8s.io/v1/namespaces/team-a/events";
const STATUS: &str = "/apis/pushcluster.io/v1alpha1/namespaces/team-a/pushclusters/push/status";

fn ctx(client: Client) -> Arc<Context> {
    Context::new(client, Metrics::register(&mut Default::default()))
}

fn requests(fake: &Shared) -> Vec<(Method, String)> {
    fake.lock()
        .unwrap()
        .log
        .iter()
        .map(|s| (s.method.clone(), s.path.clone()))
        .collect()
}

fn writes(fake: &Shared) -> Vec<(Method, String)> {
    requests(fake)
        .into_iter()
        .filter(|(m, _)| *m != Method::GET)
        .collect()
}

/// What reading the status takes: the workloads (the embedded store's
/// message service is a StatefulSet), the Leases, and the comet pods (which
/// generation holds each shard).
fn observe_requests() -> Vec<(Method, String)> {
    vec![
        (Method::GET, format!("{DEPLOYMENTS}/push-comet")),
        (Method::GET, format!("{DEPLOYMENTS}/push-web")),
        (Method::GET, format!("{STATEFULSETS}/push-message")),
        (Method::GET, LEASES.into()),
        (Method::GET, PODS.into()),
    ]
}

#[tokio::test]
async fn first_reconcile_applies_every_object_then_reports_status() {
    let fake = Shared::default();
    let pc = cluster(2);
    seed(&fake, &pc);
    let action = reconcile(Arc::new(pc.clone()), ctx(start(fake.clone())))
        .await
        .unwrap();
    // The credentials first: read, created (never applied), announced.
    // Then the claim's mode: no StatefulSet yet, so the server's version
    // (the fake has none: ReadWriteOnce).
    let mut want = vec![
        (Method::GET, format!("{SECRETS}/push-credentials")),
        (Method::POST, SECRETS.into()),
        (Method::POST, EVENTS.into()),
        (Method::GET, format!("{STATEFULSETS}/push-message")),
        (Method::GET, "/version".into()),
        // A new cluster runs its internal RPC over TLS from the start: the
        // CA and the pods' certificate, created and announced.
        (Method::GET, format!("{SECRETS}/push-rpc-tls")),
        (Method::POST, SECRETS.into()),
        (Method::POST, EVENTS.into()),
    ];
    let digests = facts(&fake);
    assert_eq!(
        digests.creds.0.keys().collect::<Vec<_>>(),
        ["admin-token", "rpc-token", "subscriber-secret"]
    );
    for c in desired(&pc, &digests).unwrap() {
        want.push((Method::GET, path_of(&c)));
        want.push((Method::PATCH, path_of(&c)));
    }
    want.push((Method::GET, LEASES.into()));
    want.push((Method::GET, SERVICES.into()));
    want.push((Method::GET, SLICES.into()));
    want.push((Method::POST, EVENTS.into()));
    want.extend(observe_requests());
    want.push((Method::PATCH, STATUS.into()));
    assert_eq!(requests(&fake), want);
    let log = fake.lock().unwrap().log.clone();
    // Every apply is server-side apply with the operator's field manager.
    for s in log
        .iter()
        .filter(|s| s.method == Method::PATCH && !s.path.ends_with("/status"))
    {
        assert!(
            s.query.contains("fieldManager=pushcluster-operator") && s.query.contains("force=true"),
            "{}?{}",
            s.path,
            s.query
        );
        assert_eq!(s.body["metadata"]["ownerReferences"][0]["uid"], "pc-uid");
    }
    let status = &log.last().unwrap().body["status"];
    assert_eq!(status["observedGeneration"], 1);
    assert_eq!(status["rpcTls"], "Required");
    assert_eq!(status["readyShards"], 0);
    assert_eq!(status["shards"].as_array().unwrap().len(), 2);
    let ready = status["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == "Ready")
        .unwrap();
    assert_eq!(
        (ready["status"].as_str(), ready["reason"].as_str()),
        (Some("False"), Some("Waiting"))
    );
    assert_eq!(
        action,
        kube::runtime::controller::Action::requeue(Duration::from_secs(5))
    );
}

/// The PushCluster as the fake holds it after a reconcile (with its status).
fn stored(fake: &Shared) -> PushCluster {
    let mut pc = cluster(2);
    let status = fake.lock().unwrap().objects[STATUS.trim_end_matches("/status")]["status"].clone();
    pc.status = Some(serde_json::from_value(status).unwrap());
    pc
}

#[tokio::test]
async fn a_no_op_reconcile_writes_nothing() {
    let fake = Shared::default();
    let client = start(fake.clone());
    seed(&fake, &cluster(2));
    reconcile(Arc::new(cluster(2)), ctx(client.clone()))
        .await
        .unwrap();
    let pc = stored(&fake);
    fake.lock().unwrap().log.clear();
    reconcile(Arc::new(pc.clone()), ctx(client)).await.unwrap();
    // The live StatefulSet settles the claim's mode: nothing else is asked.
    let mut want: Vec<(Method, String)> = vec![
        (Method::GET, format!("{SECRETS}/push-credentials")),
        (Method::GET, format!("{STATEFULSETS}/push-message")),
        (Method::GET, format!("{SECRETS}/push-rpc-tls")),
    ];
    want.extend(
        desired(&pc, &facts(&fake))
            .unwrap()
            .iter()
            .map(|c| (Method::GET, path_of(c))),
    );
    want.push((Method::GET, LEASES.into()));
    want.push((Method::GET, SERVICES.into()));
    want.push((Method::GET, SLICES.into()));
    want.extend(observe_requests());
    assert_eq!(requests(&fake), want);
    assert_eq!(writes(&fake), vec![], "a no-op reconcile must not write");
}

#[tokio::test]
async fn drift_in_a_managed_field_is_repaired() {
    let fake = Shared::default();
    let client = start(fake.clone());
    seed(&fake, &cluster(2));
    reconcile(Arc::new(cluster(2)), ctx(client.clone()))
        .await
        .unwrap();
    let pc = stored(&fake);
    let dep = format!("{DEPLOYMENTS}/push-web");
    fake.lock().unwrap().objects.get_mut(&dep).unwrap()["spec"]["replicas"] = json!(7);
    fake.lock().unwrap().log.clear();
    reconcile(Arc::new(pc), ctx(client)).await.unwrap();
    let w = writes(&fake);
    assert_eq!(
        w,
        vec![(Method::PATCH, dep.clone()), (Method::POST, EVENTS.into())]
    );
    assert_eq!(fake.lock().unwrap().objects[&dep]["spec"]["replicas"], 2);
}

#[tokio::test]
async fn fewer_shards_remove_their_services_slices_and_leases() {
    let fake = Shared::default();
    let client = start(fake.clone());
    seed(&fake, &cluster(3));
    reconcile(Arc::new(cluster(3)), ctx(client.clone()))
        .await
        .unwrap();
    for k in 0..3 {
        fake.lock().unwrap().objects.insert(
            format!("{LEASES}/push-comet-{k}"),
            json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                   "metadata": {"name": format!("push-comet-{k}"), "namespace": NS, "labels": {"pushcluster.io/cluster": "push", "pushcluster.io/shard": k.to_string()}},
                   "spec": {"holderIdentity": format!("comet-pod-{k}"), "leaseTransitions": 1, "acquireTime": "2026-11-25T10:00:00.000000Z"}}),
        );
    }
    // What the EndpointSlice controller made while shard Services had a
    // selector (it copies their labels): left to the operator to remove.
    fake.lock().unwrap().objects.insert(
        format!("{SLICES}/push-comet-0-x7k2p"),
        json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": "IPv4", "endpoints": [],
               "metadata": {"name": "push-comet-0-x7k2p", "namespace": NS, "labels": {
                   "pushcluster.io/cluster": "push", "pushcluster.io/shard": "0",
                   "kubernetes.io/service-name": "push-comet-0",
                   "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io"}}}),
    );
    fake.lock().unwrap().log.clear();
    let mut pc = stored(&fake);
    pc.spec.comet.shards = 2;
    pc.metadata.generation = Some(2);
    reconcile(Arc::new(pc), ctx(client)).await.unwrap();
    let deletes: Vec<String> = writes(&fake)
        .into_iter()
        .filter(|(m, _)| *m == Method::DELETE)
        .map(|(_, p)| p)
        .collect();
    assert_eq!(
        deletes,
        vec![
            format!("{LEASES}/push-comet-2"),
            format!("{SERVICES}/push-comet-2"),
            format!("{SLICES}/push-comet-0-x7k2p"),
            format!("{SLICES}/push-comet-2"),
        ]
    );
    let patched: Vec<String> = writes(&fake)
        .into_iter()
        .filter(|(m, _)| *m == Method::PATCH)
        .map(|(_, p)| p)
        .collect();
    assert!(
        !patched.contains(&"/api/v1/namespaces/team-a/configmaps/push-config".to_owned()),
        "the shard count is in no config: a reshard rewrites no ConfigMap"
    );
    assert!(
        patched.contains(&format!("{DEPLOYMENTS}/push-comet")),
        "new replica count"
    );
    assert!(patched.contains(&STATUS.to_owned()));
    let f = fake.lock().unwrap();
    let status = &f.objects[STATUS.trim_end_matches("/status")]["status"];
    assert_eq!(status["shards"].as_array().unwrap().len(), 2);
    assert_eq!(status["shards"][1]["holder"], "comet-pod-1");
    assert_eq!(status["readyShards"], 2);
    assert_eq!(status["observedGeneration"], 2);
}

#[tokio::test]
async fn a_rejected_apply_sets_degraded_warns_and_backs_off() {
    let fake = Shared::default();
    let client = start(fake.clone());
    fake.lock()
        .unwrap()
        .reject
        .push(format!("{DEPLOYMENTS}/push-comet"));
    seed(&fake, &cluster(2));
    let pc = Arc::new(cluster(2));
    let c = ctx(client);
    let err = reconcile(pc.clone(), c.clone()).await.unwrap_err();
    assert!(err.to_string().contains("rejected by admission"), "{err}");
    let log = fake.lock().unwrap().log.clone();
    let event = log
        .iter()
        .find(|s| s.path == EVENTS && s.body["type"] == "Warning")
        .expect("a Warning event");
    assert_eq!(event.body["type"], "Warning");
    assert_eq!(event.body["reason"], "ApplyFailed");
    let status = log
        .iter()
        .rfind(|s| s.path == STATUS)
        .expect("status patched");
    let degraded = status.body["status"]["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == "Degraded")
        .unwrap()
        .clone();
    assert_eq!(
        (degraded["status"].as_str(), degraded["reason"].as_str()),
        (Some("True"), Some("ApplyFailed"))
    );
    assert!(degraded["message"].as_str().unwrap().contains("push-comet"));
    // Nothing after the failed object was applied.
    assert!(!log
        .iter()
        .any(|s| s.method == Method::PATCH && s.path == format!("{DEPLOYMENTS}/push-web")));
    assert_eq!(
        error_policy(pc.clone(), &err, c.clone()),
        kube::runtime::controller::Action::requeue(Duration::from_secs(5))
    );
    assert_eq!(
        error_policy(pc.clone(), &err, c.clone()),
        kube::runtime::controller::Action::requeue(Duration::from_secs(10))
    );
    let _ = pc.object_ref(&());
}

#[tokio::test]
async fn an_unavailable_api_server_fails_the_reconcile_and_backs_off() {
    let fake = Shared::default();
    let client = start(fake.clone());
    seed(&fake, &cluster(2));
    fake.lock().unwrap().down = true;
    let pc = Arc::new(cluster(2));
    let c = ctx(client);
    let err = reconcile(pc.clone(), c.clone()).await.unwrap_err();
    assert!(err.to_string().contains("etcd is down"), "{err}");
    assert_eq!(err.metric_label(), "kube");
    // It stopped at the first read (the credentials) and tried to record
    // Degraded.
    let log = requests(&fake);
    assert_eq!(
        log.first(),
        Some(&(Method::GET, format!("{SECRETS}/push-credentials")))
    );
    assert!(!log.iter().any(|(_, p)| p.contains("configmaps")));
    assert!(log.iter().any(|(m, p)| *m == Method::PATCH && p == STATUS));
    let requeue = |s| kube::runtime::controller::Action::requeue(Duration::from_secs(s));
    for want in [5, 10, 20, 40] {
        assert_eq!(error_policy(pc.clone(), &err, c.clone()), requeue(want));
    }
    // Recovered, a success resets the backoff.
    fake.lock().unwrap().down = false;
    reconcile(pc.clone(), c.clone()).await.unwrap();
    assert_eq!(error_policy(pc, &err, c), requeue(5));
}
