//! `ditfleetctl rabbitmq-permissions`: the broker permissions of the fleet's users.

use super::*;

pub(crate) fn rabbitmq_permissions(vhost: &str, prefix: &str, tenants: &[String], cfg: &CommonConfig) -> i32 {
    use ditfleet_common::topology::{Role, TopicPermissions};
    let topo = Topology::new(&cfg.namespace);
    let q = |s: &str| format!("'{}'", s.replace('\'', r"'\''"));
    let mut backends: Vec<(String, String, TopicPermissions)> = Vec::new();
    if tenants.is_empty() {
        let tp = topo
            .topic_permissions(Role::Backend)
            .expect("a backend has topic permissions");
        backends.push((format!("{prefix}-backend"), "BACKEND".into(), tp));
    }
    for tenant in tenants {
        match topo.tenant_topic_permissions(tenant) {
            Ok(tp) => backends.push((
                format!("{prefix}-backend-{tenant}"),
                format!("BACKEND_{}", tenant.to_uppercase().replace('-', "_")),
                tp,
            )),
            Err(e) => {
                eprintln!("{e}");
                return 2;
            }
        }
    }
    out!(
        "# least-privilege RabbitMQ users of namespace {:?}: set_permissions <configure> <write> <read>,",
        cfg.namespace
    );
    out!("# set_topic_permissions <exchange> <write> <read> (docs/operations.md \"RabbitMQ users\")");
    let print_user = |user: &str, password_var: &str, role: Role, topic: Option<&TopicPermissions>| {
        let p = topo.permissions(role);
        out!("rabbitmqctl add_user {} \"$PASSWORD_{password_var}\"", q(user));
        out!(
            "rabbitmqctl set_permissions -p {} {} {} {} {}",
            q(vhost),
            q(user),
            q(&p.configure),
            q(&p.write),
            q(&p.read)
        );
        if let Some(t) = topic {
            out!(
                "rabbitmqctl set_topic_permissions -p {} {} {} {} {}",
                q(vhost),
                q(user),
                q(&t.exchange),
                q(&t.write),
                q(&t.read)
            );
        }
    };
    for (user, var, tp) in &backends {
        print_user(user, var, Role::Backend, Some(tp));
    }
    for (role, name) in [(Role::Scheduler, "scheduler"), (Role::Worker, "worker")] {
        print_user(
            &format!("{prefix}-{name}"),
            &name.to_uppercase(),
            role,
            topo.topic_permissions(role).as_ref(),
        );
    }
    0
}
