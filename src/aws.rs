//! AWS clients, configured the SDK's standard way: region, credentials and `AWS_ENDPOINT_URL`
//! (or `AWS_ENDPOINT_URL_SQS` / `_S3`) come from the environment and profile as usual.

use aws_config::BehaviorVersion;

pub async fn load() -> aws_config::SdkConfig {
    aws_config::defaults(BehaviorVersion::latest()).load().await
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
