//! Prints the PushCluster CRD as YAML; `crds/` holds its output.
use kube::CustomResourceExt;

fn main() -> Result<(), serde_yaml::Error> {
    print!(
        "{}",
        serde_yaml::to_string(&push_operator::crd::PushCluster::crd())?
    );
    Ok(())
}
