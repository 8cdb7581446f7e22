drop function jobhost.assert_clean(integer, integer, text[], text, text[]);
drop function jobhost.watch_settings();
drop table jobhost.watched_settings;
