//! Correctness, checked on every run that creates customers: waiting until the integration
//! service has handled them all, then counting welcome package requests per customer by paging
//! through Inventory. Exactly one each, or the run fails.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use anyhow::{Context, bail};
use mip_integration::deliver::PACKAGE_TYPE;
use mip_proto::integration::v1::GetStatusRequest;
use mip_proto::inventory::v1::ListPackageRequestsRequest;
use serde::Serialize;
use tokio::time::Instant;
use uuid::Uuid;

use crate::load::{Created, IntegrationClient, InventoryClient, micros};

/// Pause between two looks at the integration service's counters.
const STATUS_EVERY: Duration = Duration::from_millis(10);

/// How long the listing may still miss packages the counter already counted (it is bumped
/// right after Inventory answers, so normally not at all).
const LISTING_GRACE: Duration = Duration::from_secs(10);

/// Customers named in a failure message, at most.
const EXAMPLES: usize = 5;

/// Waits until the integration service (every worker of a cluster, added up) has handled
/// `target` customers (delivered or dead-lettered); fails if the counters stop moving for
/// `stall`.
pub async fn wait_delivered(
    workers: &mut [IntegrationClient],
    target: usize,
    stall: Duration,
) -> anyhow::Result<()> {
    let target = target as i64;
    let (mut last, mut last_change) = (-1, Instant::now());
    loop {
        let mut handled = 0;
        let mut status = None;
        for client in workers.iter_mut() {
            let one = client
                .get_status(GetStatusRequest {})
                .await
                .context("GetStatus")?
                .into_inner();
            // Dead letters are counted too: waiting for them would only end in the stall
            // error, and the package check below names the customers they left without one.
            handled += one.delivered + one.dead_lettered;
            status.get_or_insert(one);
        }
        let status = status.context("no integration worker to ask")?;
        if handled >= target {
            return Ok(());
        }
        if handled > last {
            (last, last_change) = (handled, Instant::now());
        } else if last_change.elapsed() > stall {
            bail!(
                "delivery stalled: {} of {target} customers handled, no progress for {stall:?} \
                 (retried {}, dead-lettered {}, mode {:?}, lag {} events)",
                handled,
                status.retried,
                status.dead_lettered,
                status.mode(),
                status.lag_events
            );
        }
        tokio::time::sleep(STATUS_EVERY).await;
    }
}

/// What Inventory holds for one customer.
#[derive(Debug, Clone, Copy)]
pub struct Packages {
    /// Welcome package requests.
    pub count: u32,
    /// `create_time` of the first one, in microseconds since the epoch (Inventory's clock).
    pub first_create_us: i64,
}

/// Welcome package requests per customer, through ListPackageRequests paging.
async fn welcome_packages(inventory: &InventoryClient) -> anyhow::Result<HashMap<Uuid, Packages>> {
    let mut inventory = inventory.clone();
    let mut found: HashMap<Uuid, Packages> = HashMap::new();
    let mut page_token = String::new();
    loop {
        let page = inventory
            .list_package_requests(ListPackageRequestsRequest {
                customer_id: String::new(),
                page_size: 1000,
                page_token,
            })
            .await
            .context("ListPackageRequests")?
            .into_inner();
        for package in page.package_requests {
            if package.package_type != PACKAGE_TYPE {
                continue;
            }
            let customer = Uuid::parse_str(&package.customer_id).with_context(|| {
                format!("package for a bad customer id {:?}", package.customer_id)
            })?;
            let create_us = micros(package.create_time.as_ref());
            found
                .entry(customer)
                .and_modify(|p| {
                    p.count += 1;
                    p.first_create_us = p.first_create_us.min(create_us);
                })
                .or_insert(Packages {
                    count: 1,
                    first_create_us: create_us,
                });
        }
        if page.next_page_token.is_empty() {
            return Ok(found);
        }
        page_token = page.next_page_token;
    }
}

/// The outcome of the one-package-per-customer check.
#[derive(Debug, Clone, Serialize)]
pub struct PackageCheck {
    /// Customers created by the run.
    pub customers: usize,
    /// Customers with exactly one welcome package request.
    pub exactly_one: usize,
    /// Customers with none.
    pub missing: usize,
    /// Customers with two or more.
    pub duplicated: usize,
    /// Welcome package requests for customers the run did not create.
    pub unexpected: usize,
    /// Customer ids the run got back more than once (CRM handing out one customer twice).
    pub repeated_ids: usize,
    /// A few offending customers, for the failure message.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub examples: Vec<String>,
}

impl PackageCheck {
    fn passed(&self) -> bool {
        self.exactly_one == self.customers
            && self.missing == 0
            && self.duplicated == 0
            && self.unexpected == 0
            && self.repeated_ids == 0
    }
}

/// Checks that every created customer has exactly one welcome package request and that no
/// other customer has one. Returns the check and the listing (for latency figures).
pub async fn verify_packages(
    inventory: &InventoryClient,
    created: &[Created],
) -> anyhow::Result<(PackageCheck, HashMap<Uuid, Packages>)> {
    let deadline = Instant::now() + LISTING_GRACE;
    loop {
        let found = welcome_packages(inventory).await?;
        let check = tally(created, &found);
        // Only a shortfall can still resolve itself; anything else is final.
        let only_missing = check.missing > 0 && check.duplicated == 0 && check.unexpected == 0;
        if !only_missing || Instant::now() >= deadline {
            return Ok((check, found));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Counts, for the customers a run created, how many welcome packages each has.
fn tally(created: &[Created], found: &HashMap<Uuid, Packages>) -> PackageCheck {
    let ids: HashSet<Uuid> = created.iter().map(|c| c.id).collect();
    let mut check = PackageCheck {
        customers: ids.len(),
        exactly_one: 0,
        missing: 0,
        duplicated: 0,
        unexpected: 0,
        repeated_ids: created.len() - ids.len(),
        examples: Vec::new(),
    };
    for id in &ids {
        match found.get(id).map_or(0, |p| p.count) {
            0 => {
                check.missing += 1;
                example(&mut check.examples, format!("{id}: no welcome package"));
            }
            1 => check.exactly_one += 1,
            n => {
                check.duplicated += 1;
                example(&mut check.examples, format!("{id}: {n} welcome packages"));
            }
        }
    }
    for (id, packages) in found {
        if !ids.contains(id) {
            check.unexpected += 1;
            example(
                &mut check.examples,
                format!(
                    "{id}: {} welcome packages, not a customer of this run",
                    packages.count
                ),
            );
        }
    }
    check
}

fn example(examples: &mut Vec<String>, line: String) {
    if examples.len() < EXAMPLES {
        examples.push(line);
    }
}

/// The outcome of the fan-out check: every watcher received every event, in order.
#[derive(Debug, Clone, Serialize)]
pub struct FanoutCheck {
    /// Watchers subscribed.
    pub watchers: usize,
    /// Events each one had to receive.
    pub expected_events: u64,
    /// Watchers that received exactly those, in order, with no gap or repeat.
    pub complete: usize,
    /// A few incomplete watchers and what they got, for the failure message.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub examples: Vec<String>,
}

/// The outcome of the poll-cost check: every `ListCustomerEvents` call returned exactly the
/// events after its position, no more and no fewer (none from the head).
#[derive(Debug, Clone, Serialize)]
pub struct PollCheck {
    /// Calls made, warm-up included.
    pub polls: u64,
    /// Calls whose reply was exactly right.
    pub exact: u64,
    /// A few wrong replies, for the failure message.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub examples: Vec<String>,
}

/// A correctness check and its outcome.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "check", rename_all = "snake_case")]
pub enum Check {
    /// Every created customer has exactly one welcome package request.
    OneWelcomePackageEach(PackageCheck),
    /// Every watcher received every event.
    EveryWatcherEveryEvent(FanoutCheck),
    /// Every poll returned exactly the new events: none from the head, k from k behind it.
    PollsReturnTheNewEvents(PollCheck),
}

impl Check {
    /// Whether it passed.
    pub fn passed(&self) -> bool {
        match self {
            Check::OneWelcomePackageEach(check) => check.passed(),
            Check::EveryWatcherEveryEvent(check) => check.complete == check.watchers,
            Check::PollsReturnTheNewEvents(check) => check.polls > 0 && check.exact == check.polls,
        }
    }

    /// One line for people, with the counts (and examples when it failed).
    pub fn summary(&self) -> String {
        let (mut line, examples) = match self {
            Check::OneWelcomePackageEach(c) => (
                format!(
                    "one welcome package per customer: {} of {} customers have exactly one \
                     ({} none, {} two or more, {} for unknown customers, {} ids repeated)",
                    c.exactly_one,
                    c.customers,
                    c.missing,
                    c.duplicated,
                    c.unexpected,
                    c.repeated_ids
                ),
                &c.examples,
            ),
            Check::EveryWatcherEveryEvent(c) => (
                format!(
                    "every watcher every event: {} of {} watchers received all {} events in order",
                    c.complete, c.watchers, c.expected_events
                ),
                &c.examples,
            ),
            Check::PollsReturnTheNewEvents(c) => (
                format!(
                    "polls return the new events: {} of {} ListCustomerEvents calls returned \
                     exactly the events after their position",
                    c.exact, c.polls
                ),
                &c.examples,
            ),
        };
        if !self.passed() {
            for example in examples {
                line.push_str("\n           ");
                line.push_str(example);
            }
        }
        line
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn customer(n: u128) -> Created {
        Created {
            id: Uuid::from_u128(n),
            create_us: 0,
        }
    }

    fn packages(count: u32) -> Packages {
        Packages {
            count,
            first_create_us: 0,
        }
    }

    #[test]
    fn one_package_each_passes() {
        let created = [customer(1), customer(2)];
        let found = HashMap::from([(created[0].id, packages(1)), (created[1].id, packages(1))]);
        let check = tally(&created, &found);
        assert!(
            Check::OneWelcomePackageEach(check.clone()).passed(),
            "{check:?}"
        );
        assert_eq!(check.exactly_one, 2);
    }

    #[test]
    fn missing_duplicated_and_unknown_packages_each_fail_the_check() {
        let created = [customer(1), customer(2), customer(3)];
        let found = HashMap::from([
            (created[0].id, packages(1)),
            (created[1].id, packages(2)),
            (Uuid::from_u128(99), packages(1)),
        ]);
        let check = tally(&created, &found);
        assert_eq!(
            (
                check.exactly_one,
                check.missing,
                check.duplicated,
                check.unexpected
            ),
            (1, 1, 1, 1)
        );
        assert_eq!(check.examples.len(), 3, "each problem is named");
        assert!(!Check::OneWelcomePackageEach(check).passed());
    }

    #[test]
    fn a_customer_id_returned_twice_fails_the_check() {
        let created = [customer(1), customer(1)];
        let found = HashMap::from([(created[0].id, packages(1))]);
        let check = tally(&created, &found);
        assert_eq!(check.repeated_ids, 1);
        assert!(!Check::OneWelcomePackageEach(check).passed());
    }
}
