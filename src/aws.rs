//! AWS clients, configured the SDK's standard way: region, credentials and `AWS_ENDPOINT_URL`
//! (or `AWS_ENDPOINT_URL_SQS` / `_S3`) come from the environment and profile as usual.

use std::time::Duration;

use aws_config::BehaviorVersion;
use aws_config::timeout::TimeoutConfig;

pub async fn load() -> aws_config::SdkConfig {
    aws_config::defaults(BehaviorVersion::latest()).load().await
}

/// `sdk` with every call bounded: an attempt ends after `attempt` (the SDK retries it), the
/// whole call after `operation`. Without them one hung request (a frozen proxy, a half-open
/// connection) holds whatever awaits it: a lease release, a visibility renewal, the intake
/// (issue 25). `attempt` stays above the 10 s long polls (the settings table's minimum).
pub fn with_timeouts(
    sdk: &aws_config::SdkConfig,
    attempt: Duration,
    operation: Duration,
) -> aws_config::SdkConfig {
    // The loader's own timeouts (connect) are kept; these two are added.
    let timeouts = sdk
        .timeout_config()
        .map(TimeoutConfig::to_builder)
        .unwrap_or_default()
        .operation_attempt_timeout(attempt)
        .operation_timeout(operation.max(attempt))
        .build();
    sdk.to_builder().timeout_config(timeouts).build()
}

pub fn sqs(sdk: &aws_config::SdkConfig) -> aws_sdk_sqs::Client {
    aws_sdk_sqs::Client::new(sdk)
}

/// Path-style addressing: edit buckets have dots in their names
/// (`edit.amelia.webordinary.com`), which virtual-host style cannot serve over HTTPS, and local
/// S3 servers want it too.
pub fn s3(sdk: &aws_config::SdkConfig) -> aws_sdk_s3::Client {
    let config = aws_sdk_s3::config::Builder::from(sdk)
        .force_path_style(true)
        .build();
    aws_sdk_s3::Client::from_conf(config)
}

pub fn cloudfront(sdk: &aws_config::SdkConfig) -> aws_sdk_cloudfront::Client {
    aws_sdk_cloudfront::Client::new(sdk)
}
