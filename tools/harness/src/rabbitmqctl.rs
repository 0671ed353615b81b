//! What RabbitMQ says about a namespace's consumers, read from the output of
//! `rabbitmqctl list_connections` and `list_channels` (run with `-q` and the
//! arguments below). Roles name their connections `<role>/<namespace>`
//! (`holdfast-worker/holdfast`), which is how a connection is matched to a
//! role. The reconnect test and the chaos harness check with it that the
//! consumers came back with their prefetch.

/// Arguments for `rabbitmqctl -q`: one line per connection, pid and client properties.
pub const LIST_CONNECTIONS: &[&str] = &[
    "list_connections",
    "--no-table-headers",
    "pid",
    "client_properties",
];

/// Arguments for `rabbitmqctl -q`: one line per channel, its connection, prefetch and consumers.
pub const LIST_CHANNELS: &[&str] = &[
    "list_channels",
    "--no-table-headers",
    "connection",
    "prefetch_count",
    "consumer_count",
];

/// (connection pid, role) of the connections of `namespace`, from [`LIST_CONNECTIONS`] output.
pub fn connections(list_connections: &str, namespace: &str) -> Vec<(String, String)> {
    // client_properties holds {"connection_name","holdfast-worker/<ns>"}.
    const MARKER: &str = "{\"connection_name\",\"";
    let suffix = format!("/{namespace}\"}}");
    list_connections
        .lines()
        .filter_map(|line| {
            let (pid, props) = line.split_once('\t')?;
            let rest = &props[props.find(MARKER)? + MARKER.len()..];
            let end = rest.find(&suffix)?;
            Some((pid.to_string(), rest[..end].to_string()))
        })
        .collect()
}

/// (role, prefetch) of every channel with a consumer on one of `connections`,
/// from [`LIST_CHANNELS`] output, sorted.
pub fn consumer_prefetch(
    list_channels: &str,
    connections: &[(String, String)],
) -> Vec<(String, u64)> {
    let mut out: Vec<(String, u64)> = list_channels
        .lines()
        .filter_map(|line| {
            let cols: Vec<&str> = line.split('\t').collect();
            if cols.len() != 3 || cols[2] == "0" {
                return None;
            }
            let (_, role) = connections.iter().find(|(pid, _)| pid == cols[0])?;
            Some((role.clone(), cols[1].parse().ok()?))
        })
        .collect();
    out.sort();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_consuming_channels_to_roles() {
        let conns = "<rabbit@h.1.2>\t[{\"product\",\"lapin\"},{\"connection_name\",\"holdfast-worker/ns1\"}]\n\
                     <rabbit@h.1.3>\t[{\"connection_name\",\"holdfast-worker/ns2\"}]\n\
                     <rabbit@h.1.4>\t[{\"connection_name\",\"holdfast-coordinator/ns1\"}]\n";
        let found = connections(conns, "ns1");
        assert_eq!(
            found,
            [
                ("<rabbit@h.1.2>".to_string(), "holdfast-worker".to_string()),
                (
                    "<rabbit@h.1.4>".to_string(),
                    "holdfast-coordinator".to_string()
                )
            ]
        );
        let channels = "<rabbit@h.1.2>\t16\t1\n<rabbit@h.1.2>\t0\t0\n<rabbit@h.1.3>\t9\t1\n<rabbit@h.1.4>\t32\t1\n";
        assert_eq!(
            consumer_prefetch(channels, &found),
            [
                ("holdfast-coordinator".to_string(), 32),
                ("holdfast-worker".to_string(), 16)
            ]
        );
    }
}
