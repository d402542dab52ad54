//! The private PostgreSQL server starts, serves a database per test, survives a crash, and
//! stops with the test process.

use mip_testkit::postgres::PgServer;

#[test]
fn a_private_server_serves_fresh_databases_and_restarts_after_a_crash() {
    let Some(server) = PgServer::start_or_skip() else {
        return;
    };
    let a = server.create_database();
    let b = server.create_database();
    assert_ne!(a, b);
    assert!(a.starts_with("postgres://postgres@127.0.0.1:"), "{a}");
    server.kill();
    server.restart();
    server.psql("SELECT 1");
}
