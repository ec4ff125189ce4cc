//! Prints the PushCluster CRD as YAML; `crds/` holds its output (`make crds`).

fn main() -> Result<(), serde_yaml::Error> {
    print!("{}", push_operator::crd::crd_yaml()?);
    Ok(())
}
