drop table jobhost.host_plugins;
drop table jobhost.plugin_versions;
drop table jobhost.plugin_blobs;
