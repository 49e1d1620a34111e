//! CLI commands for links: a component's import served by another component.

use clap::Subcommand;
use trellis_schemas::control::{LinkAddRequest, LinkListRequest, LinkRemoveRequest};
use trellis_schemas::link::{Interface, LinkRecord};
use trellis_schemas::{AssignmentTarget, ComponentName, LinkId};

use crate::capabilities::parse_target;
use crate::cli::{Failure, Global, Output, ago, print_json};
use crate::client::CtlClient;
use crate::output::Table;

/// `trellis link …`
#[derive(Debug, Subcommand)]
pub enum LinkCommand {
    /// Serve an interface a component imports with another component.
    #[command(disable_version_flag = true)]
    Add {
        /// Who calls: `component:<name>`, `instance:<id>`, or a bare component name or
        /// instance id (a ULID).
        #[arg(value_parser = parse_target)]
        source: AssignmentTarget,
        /// The interface the source imports, `namespace:package/interface`.
        interface: Interface,
        /// The component that serves it (registered, and exporting the interface).
        target: ComponentName,
        /// Only the target's versions matching this semver requirement (`^1.2`) serve it.
        #[arg(long)]
        version: Option<String>,
    },
    /// Remove a link: calls through it fail with access denied from then on.
    #[command(alias = "remove")]
    Rm {
        /// The link id.
        link_id: LinkId,
    },
    /// List links in force.
    #[command(alias = "list")]
    Ls {
        /// Only links from or to this component.
        #[arg(long)]
        component: Option<ComponentName>,
    },
}

fn print_links(records: &[LinkRecord]) {
    let mut table = Table::new(&["LINK", "SOURCE", "INTERFACE", "TARGET", "VERSION", "ADDED"]);
    for r in records {
        let l = &r.link;
        table.row(vec![
            l.link_id.to_string(),
            l.source.describe(),
            l.interface.to_string(),
            l.target.to_string(),
            l.version.clone().unwrap_or_else(|| "*".to_owned()),
            ago(r.added_at),
        ]);
    }
    print!("{}", table.render());
}

pub(crate) async fn link(g: &Global, client: &CtlClient, cmd: LinkCommand) -> Result<(), Failure> {
    match cmd {
        LinkCommand::Add {
            source,
            interface,
            target,
            version,
        } => {
            let reply = client
                .request(&LinkAddRequest {
                    source,
                    interface,
                    target,
                    version,
                })
                .await?;
            if g.output == Output::Json {
                return print_json(&reply);
            }
            let l = &reply.link;
            println!(
                "linked {} of {} to {} ({}, seq {})",
                l.interface,
                l.source.describe(),
                l.target,
                l.link_id,
                reply.seq
            );
            Ok(())
        }
        LinkCommand::Rm { link_id } => {
            let reply = client.request(&LinkRemoveRequest { link_id }).await?;
            if g.output == Output::Json {
                return print_json(&reply);
            }
            let l = &reply.link;
            println!(
                "removed {} ({} of {} to {})",
                l.link_id,
                l.interface,
                l.source.describe(),
                l.target
            );
            Ok(())
        }
        LinkCommand::Ls { component } => {
            let reply = client
                .request(&LinkListRequest {
                    component,
                    min_seq: None,
                })
                .await?;
            if g.output == Output::Json {
                return print_json(&reply);
            }
            print_links(&reply.links);
            Ok(())
        }
    }
}
